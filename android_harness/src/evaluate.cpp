#include "evaluate.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "json.hpp"

namespace prge {
namespace {

// Rows [start, start + n) into one batch of exactly `batch` rows (the program's fixed eval
// batch): the last batch is padded with copies of its first row, as the Python driver pads.
void fill_batch(const std::vector<int64_t>& from, int width, int start, int n, int batch, std::vector<int64_t>& to) {
  for (int r = 0; r < batch; ++r) {
    int src = start + (r < n ? r : 0);
    std::copy_n(from.begin() + size_t(src) * width, width, to.begin() + size_t(r) * width);
  }
}

EvalResult label_words(PrgeProgram& program, const Manifest& m, const Rows& rows) {
  const int e = m.eval_batch_size, t = m.seq_len, k = m.num_labels;
  long correct = 0;
  double total_loss = 0;
  std::vector<int64_t> ids(size_t(e) * t), mask(size_t(e) * t);
  for (int start = 0; start < rows.count; start += e) {
    int n = std::min(e, rows.count - start);
    fill_batch(rows.ids, t, start, n, e, ids);
    fill_batch(rows.mask, t, start, n, e, mask);
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
  EvalResult result;
  result.accuracy = double(correct) / rows.count;
  result.loss = total_loss / rows.count;
  return result;
}

// Each row's mean loss weighted by its number of scored targets: the loss per scored token.
EvalResult completions(PrgeProgram& program, const Manifest& m, const Rows& rows) {
  const int e = m.eval_batch_size, t = m.seq_len;
  double total = 0;
  long long tokens = 0;
  std::vector<int64_t> ids(size_t(e) * t), mask(size_t(e) * t), targets(size_t(e) * t);
  for (int start = 0; start < rows.count; start += e) {
    int n = std::min(e, rows.count - start);
    fill_batch(rows.ids, t, start, n, e, ids);
    fill_batch(rows.mask, t, start, n, e, mask);
    fill_batch(rows.labels, t, start, n, e, targets);
    std::vector<float> losses = program.eval_losses(ids, mask, targets);
    for (int r = 0; r < n; ++r) {
      auto first = rows.labels.begin() + size_t(start + r) * t;
      long long count = std::count_if(first, first + t, [](int64_t x) { return x != kIgnoreTarget; });
      total += double(losses[size_t(r)]) * double(count);
      tokens += count;
    }
  }
  EvalResult result;
  result.completion = true;
  result.loss = total / double(tokens);
  result.perplexity = std::exp(result.loss);
  return result;
}

}  // namespace

std::string EvalResult::json_fields() const {
  if (completion) return "\"loss\": " + format_double(loss) + ", \"perplexity\": " + format_double(perplexity);
  return "\"accuracy\": " + format_double(accuracy) + ", \"loss\": " + format_double(loss);
}

EvalResult evaluate(PrgeProgram& program, const Manifest& m, const Rows& rows) {
  return m.completion ? completions(program, m, rows) : label_words(program, m, rows);
}

}  // namespace prge
