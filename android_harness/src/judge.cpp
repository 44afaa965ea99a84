#include "judge.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace prge {

double lower_median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[(values.size() - 1) / 2];
}

StepJudge::StepJudge(double eps, double diverge_factor, int num_labels, int max_bad_steps, std::vector<double> baseline)
    : eps_(eps), diverge_factor_(diverge_factor), num_labels_(num_labels), max_bad_steps_(max_bad_steps),
      baseline_(std::move(baseline)) {}

double StepJudge::threshold() const {
  if (diverge_factor_ <= 0 || baseline_.empty()) return NAN;
  return diverge_factor_ * std::max(lower_median(baseline_), std::log(double(num_labels_)));
}

std::string StepJudge::fault_of(const std::vector<float>& losses, double mean_loss) const {
  if (!std::isfinite(mean_loss)) return "non-finite loss";
  // An exploded adapter saturates the model into identical finite losses: g would be 0 forever.
  if (std::all_of(losses.begin(), losses.end(), [&](float x) { return x == losses[0]; }))
    return "degenerate loss (all 2q losses equal: the perturbations change nothing)";
  double limit = threshold();
  if (!std::isnan(limit) && mean_loss > limit) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "diverged loss (mean %.4g > %.4g, %g x the baseline)", mean_loss, limit, diverge_factor_);
    return buf;
  }
  return "";
}

Verdict StepJudge::judge(const std::vector<float>& losses) {
  Verdict v;
  for (float x : losses) v.mean_loss += double(x);
  v.mean_loss /= double(losses.size());
  v.fault = fault_of(losses, v.mean_loss);
  const size_t q = losses.size() / 2;
  v.g.assign(q, 0.0);
  if (v.fault.empty()) {
    for (size_t i = 0; i < q; ++i) v.g[i] = (double(losses[i]) - double(losses[i + q])) / (2.0 * eps_);
    bad_in_a_row_ = 0;
    if (baseline_.size() < kBaselineSteps) baseline_.push_back(v.mean_loss);
  } else {  // a numerical fault: skip this step's update rather than poison B
    ++bad_in_a_row_;
    ++bad_total_;
  }
  return v;
}

}  // namespace prge
