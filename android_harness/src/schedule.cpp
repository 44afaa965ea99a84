#include "schedule.hpp"

#include <algorithm>
#include <stdexcept>

namespace prge {

int64_t step_seed(uint64_t run_seed, uint64_t step) {
  // splitmix64 of (run seed, step); uint64 arithmetic wraps exactly like Python's "& 0xFFFF...".
  uint64_t x = run_seed * 0x9E3779B97F4A7C15ull + (step + 1) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return static_cast<int64_t>((x ^ (x >> 31)) % (1ull << 31));
}

double learning_rate(const std::string& schedule, double base_lr, int step, int total_steps) {
  if (schedule == "constant") return base_lr;
  if (schedule == "linear") return base_lr * std::max(0.0, 1.0 - double(step) / double(std::max(1, total_steps)));
  throw std::runtime_error("unknown lr schedule '" + schedule + "'; expected constant or linear");
}

Due due_after(int done, int steps, int eval_every, int checkpoint_every) {
  const bool last = done == steps;
  Due due;
  due.eval = (eval_every > 0 && done % eval_every == 0) || last;
  due.checkpoint = checkpoint_every > 0 && (done % checkpoint_every == 0 || last);
  return due;
}

}  // namespace prge
