#include "judge.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace prge {

double lower_median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[(values.size() - 1) / 2];
}

double loss_spread(const std::vector<float>& losses) {
  double mean = 0;
  for (float x : losses) mean += double(x);
  mean /= double(losses.size());
  double total = 0;
  for (float x : losses) total += (double(x) - mean) * (double(x) - mean);
  return std::sqrt(total / double(losses.size()));
}

StepJudge::StepJudge(double eps, bool normalize, double diverge_factor, int num_labels, int max_bad_steps,
                     std::vector<double> baseline)
    : eps_(eps), normalize_(normalize), diverge_factor_(diverge_factor), num_labels_(num_labels), max_bad_steps_(max_bad_steps),
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
    const double scale = 2.0 * (normalize_ ? loss_spread(losses) : eps_);
    for (size_t i = 0; i < q; ++i) v.g[i] = (double(losses[i]) - double(losses[i + q])) / scale;
    bad_in_a_row_ = 0;
    if (baseline_.size() < kBaselineSteps) baseline_.push_back(v.mean_loss);
  } else {  // a numerical fault: skip this step's update rather than poison B
    ++bad_in_a_row_;
    ++bad_total_;
  }
  return v;
}

}  // namespace prge
