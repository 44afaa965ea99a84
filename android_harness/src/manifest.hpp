// manifest.json as the native driver needs it, checked against the program files on disk.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "json.hpp"

namespace prge {

// A method's input and output shapes, as the manifest's contract gives them (checked against
// this driver's contract.hpp and the manifest's own shapes).
struct MethodShapes {
  std::vector<std::string> dtypes;  // of the inputs, in order
  std::vector<std::vector<int32_t>> inputs;
  std::vector<int32_t> output;
};

struct Manifest {
  std::string dir;
  Json raw;
  std::string pte_path;
  std::string ptd_path;  // empty when the weights are inside the .pte
  std::string pte_sha256;
  int num_queries = 0;
  int batch_size = 0;
  int seq_len = 0;
  int eval_batch_size = 0;
  long long adapter_numel = 0;
  int num_labels = 0;        // label words; 0 for a completion program
  int vocab_size = 0;
  bool completion = false;   // task.loss "completion": labels [batch, seq_len] of targets, eval_losses
  std::string model_path;  // recorded in checkpoint fingerprints, as the Python driver does
  double default_lr = 1e-3;  // TrainConfig's defaults unless the export recorded others
  double default_eps = 1e-2;
  std::string prng_version;
  // The estimator (prge/estimators.py): its name goes into checkpoint fingerprints; normalize
  // says how the judge turns losses into g; noise goes into config.json for replay. Programs
  // from before estimators were a choice are spsa: Gaussian noise, plain g.
  std::string estimator = "spsa";
  std::string noise = "gaussian";
  bool normalize = false;
  std::string adapter_layout;  // export/contract/manifest.py layout_hash: sha256 of the slots as json.dumps writes them, 16 hex
  std::map<std::string, MethodShapes> methods;  // the training methods this driver calls, by name
};

// A generation program's manifest (`prge export --generate`): prefill and decode over a KV cache.
struct GenerationManifest {
  std::string pte_path;
  std::string ptd_path;  // empty when the weights are inside the .pte
  int seq_len = 0;       // the prefill window: the longest prompt
  int cache_len = 0;     // the most positions, prompt plus new tokens
  int vocab_size = 0;
  long long adapter_numel = 0;
  long long pad_token_id = 0;
  std::vector<long long> eos_token_ids;  // a generation stops at any of these
  std::map<std::string, MethodShapes> methods;  // the generation methods, by name
};

// Read DIR/manifest.json of a training (read_manifest) or generation program and check its
// contract against contract.hpp; verify_files also checks size and sha256 of the .pte/.ptd.
// Throw std::runtime_error with a message naming the file (also for a program of the other kind).
Manifest read_manifest(const std::string& program_dir, bool verify_files);
GenerationManifest read_generation_manifest(const std::string& program_dir, bool verify_files);

}  // namespace prge
