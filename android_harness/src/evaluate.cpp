#include "evaluate.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace prge {

EvalResult evaluate(PrgeProgram& program, const Manifest& m, const Rows& rows) {
  const int e = m.eval_batch_size, t = m.seq_len, k = m.num_labels;
  long correct = 0;
  double total_loss = 0;
  std::vector<int64_t> ids(size_t(e) * t), mask(size_t(e) * t);
  for (int start = 0; start < rows.count; start += e) {
    int n = std::min(e, rows.count - start);
    // The program takes exactly e rows: pad the last batch with copies of its first row.
    for (int r = 0; r < e; ++r) {
      int src = start + (r < n ? r : 0);
      std::copy_n(rows.ids.begin() + size_t(src) * t, t, ids.begin() + size_t(r) * t);
      std::copy_n(rows.mask.begin() + size_t(src) * t, t, mask.begin() + size_t(r) * t);
    }
    std::vector<float> logits = program.eval_logits(ids, mask);
    for (int r = 0; r < n; ++r) {
      const float* row = logits.data() + size_t(r) * k;
      int best = 0;
      double top = row[0];
      for (int j = 1; j < k; ++j)
        if (double(row[j]) > top) {
          top = row[j];
          best = j;
        }
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += std::exp(double(row[j]) - top);
      int label = static_cast<int>(rows.labels[size_t(start + r)]);
      correct += best == label;
      total_loss += -(double(row[label]) - top - std::log(sum));
    }
  }
  return {double(correct) / rows.count, total_loss / rows.count};
}

}  // namespace prge
