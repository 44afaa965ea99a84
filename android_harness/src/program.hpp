// The exported P-RGE program through the ExecuTorch C++ Module API: the same methods the Python
// driver calls (runtime_driver/engines.py ExecuTorchPRGE), checked against the program contract
// (contract.hpp) and called with the inputs it defines.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace executorch::extension::module {
class Module;
}

namespace prge {

class PrgeProgram {
 public:
  // Loads the program (+ .ptd) with shared memory arenas and every method up front (they share
  // the adapter buffers), then checks the methods' shapes against the manifest.
  explicit PrgeProgram(const Manifest& manifest);
  ~PrgeProgram();

  // ids/mask [batch, seq_len], labels [batch]; returns the 2q losses (+ copies first).
  std::vector<float> train_step(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                const std::vector<int64_t>& labels, int64_t prev_seed, int64_t new_seed,
                                const std::vector<double>& prev_g, double lr, double eps);
  void apply_update(int64_t prev_seed, const std::vector<double>& prev_g, double lr);
  // ids/mask [eval_batch, seq_len]; returns label-word logits [eval_batch, num_labels].
  std::vector<float> eval_logits(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask);
  std::vector<float> get_adapter();
  void set_adapter(const std::vector<float>& flat);

 private:
  const Manifest& m_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  std::vector<float> run(const std::string& method, std::vector<void*> data,
                         std::vector<std::vector<int32_t>> sizes, std::vector<int> dtypes, size_t expect_numel);
  void check_signature(const std::string& method, const MethodShapes& expected);
};

// The size of ExecuTorch's CPU thread pool (the Python driver's --threads does the same).
void set_runtime_threads(unsigned threads);

}  // namespace prge
