#include "train_loop.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "checkpoint.hpp"
#include "evaluate.hpp"
#include "failpoints.hpp"
#include "files.hpp"
#include "judge.hpp"
#include "json.hpp"
#include "metrics.hpp"
#include "safetensors.hpp"
#include "schedule.hpp"

namespace prge {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }
double round_to(double v, int digits) {
  double scale = std::pow(10.0, digits);
  return std::round(v * scale) / scale;
}

void check_options(const DataFile& data, const TrainOptions& opt) {
  if (opt.steps < 1) throw std::runtime_error("--steps must be >= 1");
  if (opt.steps > data.steps)
    throw std::runtime_error("the data file holds the row order of " + std::to_string(data.steps) + " steps, not " +
                             std::to_string(opt.steps) + "; re-run `prge export-data --steps " + std::to_string(opt.steps) + "`");
  if (opt.seed != data.run_seed)
    throw std::runtime_error("--seed " + std::to_string(opt.seed) + " differs from the data file's run seed " +
                             std::to_string(data.run_seed) + " (it fixed the row order)");
  learning_rate(opt.schedule, opt.lr, 0, opt.steps);  // rejects an unknown schedule before any file is written
}

// config.json as the Python driver writes it, where it matters: `prge replay` rebuilds the
// adapter of a native run from its log with the adapter layout recorded here.
std::string config_json(const Manifest& m, const TrainOptions& opt) {
  return "{\"engine\": \"native\", \"program\": " + quote(m.dir) + ", \"data\": " + quote(opt.data_path) +
         ", \"train\": {\"method\": \"prge\", \"steps\": " + std::to_string(opt.steps) + ", \"batch_size\": " +
         std::to_string(m.batch_size) + ", \"lr\": " + format_double(opt.lr) + ", \"eps\": " + format_double(opt.eps) +
         ", \"schedule\": " + quote(opt.schedule) + ", \"seed\": " + std::to_string(opt.seed) +
         ", \"eval_every\": " + std::to_string(opt.eval_every) + ", \"checkpoint_every\": " + std::to_string(opt.checkpoint_every) +
         ", \"max_bad_steps\": " + std::to_string(opt.max_bad_steps) + ", \"diverge_factor\": " + format_double(opt.diverge_factor) +
         "}, \"base_model\": " + quote(m.model_path) + ", \"adapter_layout\": {\"numel\": " + std::to_string(m.adapter_numel) +
         ", \"slots\": " + m.raw.at("adapter").at("slots").dump() + ", \"initial\": \"zeros\", \"noise\": " + quote(m.noise) + "}}\n";
}

}  // namespace

std::string train(PrgeProgram& program, const Manifest& m, const DataFile& data, const TrainOptions& opt,
                  const std::string& out_dir) {
  check_options(data, opt);
  make_dirs(out_dir);
  const int b = m.batch_size, t = m.seq_len;
  const std::string ckpt_dir = join(out_dir, "ckpt");
  write_file_atomic(join(out_dir, "config.json"), config_json(m, opt));
  // The runtime starts mutable buffers at zero; make the initial state explicit anyway.
  program.set_adapter(std::vector<float>(size_t(m.adapter_numel), 0.0f));
  ResumePoint resumed;
  if (opt.resume) {
    resumed = load_resume_point(m, opt, ckpt_dir);
    if (resumed.found) program.set_adapter(resumed.adapter);
    else std::fprintf(stderr, "%s: no checkpoint yet; starting from step 0\n", ckpt_dir.c_str());
  }
  const int start = resumed.step;
  const std::string fingerprint = fingerprint_json(m, opt);
  // A completion task has no guessing floor for the divergence check (ln 1 = 0), as in run.py.
  StepJudge judge(opt.eps, m.normalize, opt.diverge_factor, m.completion ? 1 : m.num_labels, opt.max_bad_steps,
                  resumed.baseline_losses);
  PendingUpdate pending(m.num_queries);
  MetricsLog metrics(join(out_dir, "metrics.jsonl"), start);
  const auto started = Clock::now();
  bool evaluated = false;
  EvalResult last;
  auto run_eval = [&](int done) {
    last = evaluate(program, m, data.validation);
    evaluated = true;
    metrics.write("{\"type\": \"eval\", \"step\": " + std::to_string(done) + ", \"split\": \"validation\", " +
                  last.json_fields() + "}");
    if (opt.quiet) return;
    if (last.completion) std::fprintf(stderr, "step %d: validation loss %.4f perplexity %.2f\n", done, last.loss, last.perplexity);
    else std::fprintf(stderr, "step %d: validation accuracy %.4f loss %.4f\n", done, last.accuracy, last.loss);
  };
  if (start == 0 && opt.eval_every > 0) run_eval(0);  // the zero-shot baseline on the same rows

  std::vector<double> step_ms;
  const int w = data.label_width;  // labels per row: 1, or a completion's seq_len targets
  std::vector<int64_t> ids(size_t(b) * t), mask(size_t(b) * t), labels(size_t(b) * w);
  for (int step = start; step < opt.steps; ++step) {
    int64_t seed = step_seed(opt.seed, uint64_t(step));
    double lr = learning_rate(opt.schedule, opt.lr, step, opt.steps);
    for (int i = 0; i < b; ++i) {
      int row = data.order[size_t(step) * b + i];
      std::copy_n(data.train.ids.begin() + size_t(row) * t, t, ids.begin() + size_t(i) * t);
      std::copy_n(data.train.mask.begin() + size_t(row) * t, t, mask.begin() + size_t(i) * t);
      std::copy_n(data.train.labels.begin() + size_t(row) * w, w, labels.begin() + size_t(i) * w);
    }
    auto began = Clock::now();
    std::vector<float> losses = program.train_step(ids, mask, labels, pending.seed, seed, pending.g, pending.lr, opt.eps);
    step_ms.push_back(ms_since(began));
    Verdict verdict = judge.judge(losses);
    std::string row = "{\"type\": \"train\", \"step\": " + std::to_string(step) + ", \"seed\": " + std::to_string(seed) +
                      ", \"lr\": " + format_double(lr) + ", \"eps\": " + format_double(opt.eps);
    if (!verdict.fault.empty()) row += ", \"fault\": " + quote(verdict.fault);
    row += ", \"g\": " + number_list(verdict.g) + ", \"losses\": " + number_list(std::vector<double>(losses.begin(), losses.end())) +
           ", \"step_ms\": " + format_double(round_to(step_ms.back(), 3)) +
           ", \"time\": " + format_double(round_to(ms_since(started) / 1000.0, 4)) + "}";
    metrics.write(row);
    if (judge.must_stop())
      throw std::runtime_error(std::to_string(judge.bad_in_a_row()) + " steps in a row had a " + verdict.fault + " (last at step " +
                               std::to_string(step) + "); lower --lr or --eps. The last checkpoint (" + ckpt_dir + ") is intact.");
    reached("after-step", step);
    pending.set(seed, verdict.g, lr);
    const int done = step + 1;
    const Due due = due_after(done, opt.steps, opt.eval_every, opt.checkpoint_every);
    if (due.flush()) pending.flush(program);  // the adapter evaluated or saved is the current one
    if (due.eval) run_eval(done);
    // No checkpoint during a fault streak: the last one stays the last good state.
    if (due.checkpoint && judge.bad_in_a_row() == 0)
      save_checkpoint(ckpt_dir, program.get_adapter(),
                      checkpoint_state(done, step_seed(opt.seed, uint64_t(done)), (long long)done * b, judge.baseline_losses(),
                                       fingerprint),
                      done);
  }

  write_file_atomic(join(out_dir, "adapter.safetensors"), encode_adapter_safetensors(program.get_adapter()));
  const double median = step_ms.empty() ? NAN : lower_median(step_ms);  // torch.median's choice too
  std::string summary = "{\"engine\": \"native\", \"method\": \"prge\", \"steps_run\": " + std::to_string(opt.steps - start) +
                        ", \"bad_steps\": " + std::to_string(judge.bad_total()) + ", \"median_step_ms\": " + format_double(median) +
                        ", \"last_validation_accuracy\": " + format_double(evaluated && !last.completion ? last.accuracy : NAN) +
                        (evaluated && last.completion ? ", \"last_validation_loss\": " + format_double(last.loss) : "") +
                        ", \"wall_s\": " + format_double(ms_since(started) / 1000.0) + "}";
  write_file_atomic(join(out_dir, "summary.json"), summary + "\n");
  return summary;
}

}  // namespace prge
