// Exported programs through the ExecuTorch C++ Module API: the training methods the Python driver
// calls (runtime_driver/engines.py ExecuTorchPRGE) and a generation program's prefill/decode
// (runtime_driver/generate.py CachedGenerator), checked against the program contract
// (contract.hpp) and called with the inputs it defines.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace executorch::extension::module {
class Module;
}

namespace prge {

// A program loaded through the ExecuTorch C++ Module API, every listed method loaded up front
// (with shared memory arenas: the methods share mutable buffers) and checked against its
// contract shapes. Both drivers call their methods through it.
class LoadedProgram {
 public:
  static constexpr int kLong = 0, kFloat = 1;  // input dtypes of run()

  LoadedProgram(const std::string& pte_path, const std::string& ptd_path, const std::map<std::string, MethodShapes>& methods);
  ~LoadedProgram();

  // Runs a method on blobs of the given sizes and dtypes; returns its float32 output (a copy).
  std::vector<float> run(const std::string& method, std::vector<void*> data, std::vector<std::vector<int32_t>> sizes,
                         std::vector<int> dtypes, size_t expect_numel);

 private:
  std::string pte_path_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  void check_signature(const std::string& method, const MethodShapes& expected);
};

class PrgeProgram {
 public:
  // Loads the training program (+ .ptd) and checks the methods' shapes against the manifest.
  explicit PrgeProgram(const Manifest& manifest);

  // ids/mask [batch, seq_len], labels [batch] (a completion program's: targets [batch, seq_len]);
  // returns the 2q losses (+ copies first).
  std::vector<float> train_step(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                const std::vector<int64_t>& labels, int64_t prev_seed, int64_t new_seed,
                                const std::vector<double>& prev_g, double lr, double eps);
  void apply_update(int64_t prev_seed, const std::vector<double>& prev_g, double lr);
  // ids/mask [eval_batch, seq_len]; returns label-word logits [eval_batch, num_labels].
  std::vector<float> eval_logits(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask);
  // A completion program's: ids/mask/targets [eval_batch, seq_len]; the mean loss of each row's
  // scored targets [eval_batch].
  std::vector<float> eval_losses(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                 const std::vector<int64_t>& targets);
  std::vector<float> get_adapter();
  void set_adapter(const std::vector<float>& flat);

 private:
  const Manifest& m_;
  LoadedProgram program_;
};

// A generation program (`prge export --generate`): the KV cache lives inside the program, so a
// generation is one prefill, then one decode per new token (runtime_driver/generate.py).
class GenerationProgram {
 public:
  explicit GenerationProgram(const GenerationManifest& manifest);

  // The prompt (1..seq_len tokens) from position 0; the next token's logits [vocab].
  std::vector<float> prefill(const std::vector<int64_t>& prompt);
  // One token at an absolute position; the next token's logits [vocab].
  std::vector<float> decode(int64_t token, int64_t position);
  void set_adapter(const std::vector<float>& flat);

 private:
  const GenerationManifest& m_;
  LoadedProgram program_;
};

// The size of ExecuTorch's CPU thread pool (the Python driver's --threads does the same).
void set_runtime_threads(unsigned threads);
// Route the runtime's log lines to stderr, its Info and Debug lines only if show_info (--verbose).
void filter_runtime_logs(bool show_info);

}  // namespace prge
