// When things happen in a run: each step's noise seed and learning rate, and after which steps
// an eval or a checkpoint is due. The Python twins: prge/estimators.py step_seed,
// prge/schedules.py learning_rate, runtime_driver/train.py due_after (tested against each other).
#pragma once

#include <cstdint>
#include <string>

namespace prge {

int64_t step_seed(uint64_t run_seed, uint64_t step);
double learning_rate(const std::string& schedule, double base_lr, int step, int total_steps);

struct Due {
  bool eval = false;
  bool checkpoint = false;  // if the judge is not in a fault streak
  bool flush() const { return eval || checkpoint; }  // the pending update goes in first
};

// Periodic evals and checkpoints (every N steps, 0: never), plus both at the end: the final
// eval always, a final checkpoint only when checkpointing.
Due due_after(int done, int steps, int eval_every, int checkpoint_every);

}  // namespace prge
