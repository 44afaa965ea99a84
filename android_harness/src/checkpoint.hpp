// run/ckpt/: the adapter (safetensors) and the loop state (JSON), replaced atomically, the same
// files and fingerprint as runtime_driver/checkpoint.py and train.py (each driver resumes the other's).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "train_options.hpp"

namespace prge {

// TrainConfig.fingerprint() + the extra keys of the Python run, in the Python key order: what a
// checkpoint records and a resume must match.
std::string fingerprint_json(const Manifest& m, const TrainOptions& opt);

// The state.json of a checkpoint taken after `done` steps (no pending update).
std::string checkpoint_state(int done, int64_t next_seed, long long data_position, const std::vector<double>& baseline_losses,
                             const std::string& fingerprint);

void save_checkpoint(const std::string& ckpt_dir, const std::vector<float>& adapter, const std::string& state, long step);

struct ResumePoint {
  bool found = false;  // false: no checkpoint was written yet, the run starts over
  int step = 0;        // the next step to run
  std::vector<float> adapter;
  std::vector<double> baseline_losses;  // the judge's divergence baseline
};

// Throws std::runtime_error naming the file for an unreadable checkpoint or one of another
// configuration (the fingerprint differs).
ResumePoint load_resume_point(const Manifest& m, const TrainOptions& opt, const std::string& ckpt_dir);

}  // namespace prge
