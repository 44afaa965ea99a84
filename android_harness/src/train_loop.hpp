// The zeroth-order training loop of runtime_driver/train.py::train_zero_order, natively: the same
// seeds, learning rates, batches, g, metrics rows, eval rows and checkpoints.
#pragma once

#include <cstdint>
#include <string>

#include "data_file.hpp"
#include "manifest.hpp"
#include "program.hpp"

namespace prge {

struct TrainOptions {
  int steps = 0;             // optimizer steps (<= the steps the data file holds an order for)
  double lr = 1e-3;          // learning rate (SGD step on B)
  double eps = 1e-2;         // perturbation scale
  std::string schedule = "constant";  // constant | linear
  uint32_t seed = 0;         // run seed (must be the data file's: it fixed the row order)
  int eval_every = 50;       // validation eval every N steps (0: only at the end)
  int checkpoint_every = 0;  // checkpoint into OUT/ckpt every N steps (0: never)
  int max_bad_steps = 10;    // consecutive faulty steps (non-finite or diverged loss) before training stops
  double diverge_factor = 10.0;  // a step's mean loss above this x the first step's is a fault (0: off)
  bool resume = false;       // continue from OUT/ckpt
  bool quiet = false;        // no progress lines on stderr
  std::string data_path;     // recorded in OUT/config.json
};

// The Python driver's functions, ported exactly (prge/estimators.py, prge/schedules.py).
int64_t step_seed(uint64_t run_seed, uint64_t step);
double learning_rate(const std::string& schedule, double base_lr, int step, int total_steps);

// Runs the loop, writes OUT/{metrics.jsonl, ckpt/, adapter.safetensors, summary.json}; returns
// the summary JSON text. Throws std::runtime_error on bad input or divergence.
std::string train(PrgeProgram& program, const Manifest& manifest, const DataFile& data, const TrainOptions& opt,
                  const std::string& out_dir);

}  // namespace prge
