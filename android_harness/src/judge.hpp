// Judging a zeroth-order step: its 2q losses become projected gradients, or a fault that makes
// no update. The same rules as runtime_driver/judge.py (tested against it case by case):
// non-finite losses, all 2q losses equal, or a mean loss above diverge_factor x the baseline,
// the baseline being the lower median mean loss of the first kBaselineSteps healthy steps and
// never below ln(num_labels), the loss of guessing uniformly. g is the plain finite difference,
// or with normalize the difference over the spread of the step's losses (prge/estimators.py
// projected_grads; computed in the same order, so both give the same bits).
#pragma once

#include <string>
#include <vector>

namespace prge {

constexpr size_t kBaselineSteps = 20;

struct Verdict {
  std::vector<double> g;  // the q projected gradients to apply (zeros on a fault)
  std::string fault;      // why the step makes no update ("" when it is fine)
  double mean_loss = 0;   // mean of the 2q losses (double, summed in order)
};

double lower_median(std::vector<double> values);
double loss_spread(const std::vector<float>& losses);  // population standard deviation, summed in order

class StepJudge {
 public:
  StepJudge(double eps, bool normalize, double diverge_factor, int num_labels, int max_bad_steps,
            std::vector<double> baseline = {});
  Verdict judge(const std::vector<float>& losses);
  double threshold() const;  // the mean loss above which a step has diverged; NaN: none yet
  bool must_stop() const { return bad_in_a_row_ >= max_bad_steps_; }
  int bad_in_a_row() const { return bad_in_a_row_; }
  int bad_total() const { return bad_total_; }
  const std::vector<double>& baseline_losses() const { return baseline_; }  // checkpointed

 private:
  std::string fault_of(const std::vector<float>& losses, double mean_loss) const;
  double eps_;
  bool normalize_;
  double diverge_factor_;
  int num_labels_, max_bad_steps_;
  std::vector<double> baseline_;
  int bad_in_a_row_ = 0, bad_total_ = 0;
};

}  // namespace prge
