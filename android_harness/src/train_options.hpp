// The settings of a native training run (prge-native's options; runtime_driver/train.py TrainConfig).
#pragma once

#include <cstdint>
#include <string>

namespace prge {

struct TrainOptions {
  int steps = 0;             // optimizer steps (<= the steps the data file holds an order for)
  double lr = 1e-3;          // learning rate (SGD step on B)
  double eps = 1e-2;         // perturbation scale
  std::string schedule = "constant";  // constant | linear
  uint32_t seed = 0;         // run seed (must be the data file's: it fixed the row order)
  int eval_every = 50;       // validation eval every N steps (0: only at the end)
  int checkpoint_every = 0;  // checkpoint into OUT/ckpt every N steps (0: never)
  int max_bad_steps = 10;    // consecutive faulty steps (judge.hpp) before training stops
  double diverge_factor = 10.0;  // a step's mean loss above this x the baseline is a fault (0: off)
  bool resume = false;       // continue from OUT/ckpt
  bool quiet = false;        // no progress lines on stderr
  std::string data_path;     // recorded in OUT/config.json
};

}  // namespace prge
