// Accuracy and mean cross-entropy over label-word logits, as runtime_driver/evaluate.py computes them.
#pragma once

#include "data_file.hpp"
#include "manifest.hpp"
#include "program.hpp"

namespace prge {

struct EvalResult {
  double accuracy, loss;
};

EvalResult evaluate(PrgeProgram& program, const Manifest& m, const Rows& rows);

}  // namespace prge
