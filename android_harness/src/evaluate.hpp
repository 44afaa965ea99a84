// Held-out metrics as runtime_driver/evaluate.py computes them: accuracy and mean cross-entropy
// over label-word logits, or a completion task's loss per scored token and its perplexity.
#pragma once

#include <string>

#include "data_file.hpp"
#include "manifest.hpp"
#include "program.hpp"

namespace prge {

struct EvalResult {
  bool completion = false;
  double accuracy = 0, loss = 0, perplexity = 0;  // accuracy: label words; perplexity: completion
  // The metrics row's fields after "split", in the Python driver's order.
  std::string json_fields() const;
};

EvalResult evaluate(PrgeProgram& program, const Manifest& m, const Rows& rows);

}  // namespace prge
