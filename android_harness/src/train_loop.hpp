// The zeroth-order training loop of runtime_driver/train.py train_zero_order, natively, in the
// same pieces: the judge (judge.hpp), the pending update and its flush (below), the schedule of
// seeds, learning rates, evals and checkpoints (schedule.hpp), checkpoints (checkpoint.hpp),
// metrics (metrics.hpp), evaluation (evaluate.hpp); this file is the thin loop over them. It
// produces the same seeds, batches, g, metrics rows, eval rows and checkpoints as the Python driver.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data_file.hpp"
#include "manifest.hpp"
#include "program.hpp"
#include "train_options.hpp"

namespace prge {

// The last step's update, not yet in the adapter: the next train_step folds it in, or flush
// applies it alone (before an eval, a checkpoint or the end).
struct PendingUpdate {
  int64_t seed = 0;
  std::vector<double> g;
  double lr = 0.0;

  explicit PendingUpdate(int num_queries) : g(size_t(num_queries), 0.0) {}
  void set(int64_t new_seed, const std::vector<double>& new_g, double new_lr) {
    seed = new_seed;
    g = new_g;
    lr = new_lr;
  }
  void flush(PrgeProgram& program) {
    program.apply_update(seed, g, lr);
    std::fill(g.begin(), g.end(), 0.0);  // applied: the next train_step must not apply it again
  }
};

// Runs the loop, writes OUT/{config.json, metrics.jsonl, ckpt/, adapter.safetensors, summary.json};
// returns the summary JSON text. Throws std::runtime_error on bad input or divergence.
std::string train(PrgeProgram& program, const Manifest& manifest, const DataFile& data, const TrainOptions& opt,
                  const std::string& out_dir);

}  // namespace prge
