#include "train_loop.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <csignal>
#include <cstdlib>
#include <dirent.h>
#include <stdexcept>
#include <unistd.h>
#include <vector>

#include "files.hpp"
#include "json.hpp"
#include "safetensors.hpp"

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

namespace {

using Clock = std::chrono::steady_clock;

// Kill points for crash tests, the same as prge/failpoints.py: PRGE_FAILPOINT=NAME[@STEP] makes
// the process SIGKILL itself there (a kill from outside rarely lands between two renames).
void reached(const std::string& name, long step) {
  const char* spec = std::getenv("PRGE_FAILPOINT");
  if (!spec || !*spec) return;
  std::string s = spec, at;
  auto sign = s.find('@');
  if (sign != std::string::npos) { at = s.substr(sign + 1); s = s.substr(0, sign); }
  if (s == name && (at.empty() || std::to_string(step) == at)) std::raise(SIGKILL);
}

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }
double round_to(double v, int digits) {
  double scale = std::pow(10.0, digits);
  return std::round(v * scale) / scale;
}

// ---- metrics.jsonl (runtime_driver/metrics.py) --------------------------------------------

class MetricsLog {
 public:
  // Keeps what was logged before the checkpoint the run (re)starts from, drops a torn last
  // line, then appends; every row is flushed and fsync'd like the Python log.
  MetricsLog(const std::string& path, int resume_step) : path_(path) {
    if (is_file(path)) {
      std::string kept, text = read_text(path);
      size_t at = 0;
      while (at < text.size()) {
        size_t nl = text.find('\n', at);
        std::string line = text.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
        at = nl == std::string::npos ? text.size() : nl + 1;
        try {
          Json row = Json::parse(line);
          long long step = row.has("step") ? row.at("step").integer("step") : -1;
          bool is_eval = row.has("type") && row.at("type").is_string() && row.at("type").string("type") == "eval";
          // A fresh run (resume_step 0) starts an empty log, as the Python one does.
          if (resume_step > 0 && (is_eval ? step <= resume_step : step < resume_step)) kept += line + "\n";
        } catch (const JsonError&) {
          // a torn last line from a killed run
        }
      }
      write_file_atomic(path, kept);
    }
    file_ = std::fopen(path.c_str(), "a");
    if (!file_) throw FileError(path + ": cannot open for appending");
  }
  ~MetricsLog() {
    if (file_) std::fclose(file_);
  }
  void write(const std::string& row) {
    std::fputs(row.c_str(), file_);
    std::fputc('\n', file_);
    std::fflush(file_);
    ::fsync(fileno(file_));
  }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

std::string number_list(const std::vector<double>& xs) {
  std::string out = "[";
  for (size_t i = 0; i < xs.size(); ++i) out += (i ? ", " : "") + format_double(xs[i]);  // null if non-finite
  return out + "]";
}

// ---- eval (runtime_driver/evaluate.py) -------------------------------------------------------

struct EvalResult {
  double accuracy, loss;
};

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
        if (double(row[j]) > top) { top = row[j]; best = j; }
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += std::exp(double(row[j]) - top);
      int label = static_cast<int>(rows.labels[size_t(start + r)]);
      correct += best == label;
      total_loss += -(double(row[label]) - top - std::log(sum));
    }
  }
  return {double(correct) / rows.count, total_loss / rows.count};
}

// Why a step's losses must not update the adapter ("" when they are fine): train.py::_loss_fault.
std::string loss_fault(const std::vector<float>& losses, double mean_loss, double first_loss, double diverge_factor) {
  if (!std::isfinite(mean_loss)) return "non-finite loss";
  // An exploded adapter saturates the model into identical finite losses: g would be 0 forever.
  if (std::all_of(losses.begin(), losses.end(), [&](float x) { return x == losses[0]; }))
    return "degenerate loss (all 2q losses equal: the perturbations change nothing)";
  if (diverge_factor > 0 && !std::isnan(first_loss) && mean_loss > diverge_factor * std::max(first_loss, 1e-8)) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "diverged loss (mean %.4g > %g x first step's %.4g)", mean_loss, diverge_factor, first_loss);
    return buf;
  }
  return "";
}

// ---- checkpoints (runtime_driver/checkpoint.py) ---------------------------------------------

std::string parent_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

// Entries of dir whose names start with one of the prefixes, sorted.
std::vector<std::string> list_prefixed(const std::string& dir, std::initializer_list<const char*> prefixes) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* ent = ::readdir(d)) {
      std::string name = ent->d_name;
      for (const char* prefix : prefixes)
        if (name.rfind(prefix, 0) == 0) out.push_back(join(dir, name));
    }
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The complete checkpoint to resume from: ckpt/, or the old copy a kill between the two
// renames of save_checkpoint left aside.
std::string find_checkpoint_dir(const std::string& ckpt_dir) {
  if (is_file(join(ckpt_dir, "state.json"))) return ckpt_dir;
  for (const auto& old : list_prefixed(parent_of(ckpt_dir), {".ckpt-old."}))
    if (is_file(join(old, "state.json"))) return old;
  return "";
}

void save_checkpoint(const std::string& ckpt_dir, const std::vector<float>& adapter, const std::string& state, long step) {
  std::string parent = parent_of(ckpt_dir);
  make_dirs(parent);
  std::string templ = join(parent, ".ckpt-new.XXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw FileError(parent + ": cannot create a temporary checkpoint directory");
  std::string tmp(buf.data());
  write_file_synced(join(tmp, "adapter.safetensors"), encode_adapter_safetensors(adapter));
  write_file_synced(join(tmp, "state.json"), state);
  fsync_dir(tmp);
  reached("ckpt-tmp-written", step);
  std::string old;
  if (is_dir(ckpt_dir)) {
    old = join(parent, ".ckpt-old." + std::to_string(::getpid()));
    if (std::rename(ckpt_dir.c_str(), old.c_str()) != 0) throw FileError(ckpt_dir + ": cannot move the old checkpoint aside");
    reached("ckpt-old-moved", step);
  }
  if (std::rename(tmp.c_str(), ckpt_dir.c_str()) != 0) throw FileError(ckpt_dir + ": cannot move the new checkpoint in");
  fsync_dir(parent);
  // The new checkpoint is in place: drop this swap's old copy and any a killed run left behind.
  for (const auto& stale : list_prefixed(parent, {".ckpt-new.", ".ckpt-old."})) remove_tree(stale);
}

// TrainConfig.fingerprint() + the extra keys of train_zero_order, in the Python key order.
std::string fingerprint_json(const Manifest& m, const TrainOptions& opt) {
  return "{\"method\": \"prge\", \"steps\": " + std::to_string(opt.steps) +
         ", \"batch_size\": " + std::to_string(m.batch_size) + ", \"lr\": " + format_double(opt.lr) +
         ", \"eps\": " + format_double(opt.eps) + ", \"schedule\": " + quote(opt.schedule) +
         ", \"seed\": " + std::to_string(opt.seed) + ", \"optimizer\": \"sgd\", \"model\": " + quote(m.model_path) +
         ", \"seq_len\": " + std::to_string(m.seq_len) + ", \"adapter_layout\": " + quote(m.adapter_layout) +
         ", \"program_sha256\": " + quote(m.pte_sha256) + ", \"num_queries\": " + std::to_string(m.num_queries) +
         ", \"prng\": " + quote(m.prng_version) + "}";
}

struct Resumed {
  int step = 0;
  double first_loss = NAN;  // the divergence baseline (NaN: not known yet)
};

// Loads the checkpoint's adapter into the program; no checkpoint yet means starting over (a run
// killed before its first one), as the Python driver does.
Resumed resume_from(PrgeProgram& program, const Manifest& m, const TrainOptions& opt, const std::string& ckpt_dir) {
  std::string found = find_checkpoint_dir(ckpt_dir);
  if (found.empty()) {
    std::fprintf(stderr, "%s: no checkpoint yet; starting from step 0\n", ckpt_dir.c_str());
    return {};
  }
  Json state;
  try {
    state = Json::parse(read_text(join(found, "state.json")));
  } catch (const JsonError& e) {
    throw std::runtime_error(join(found, "state.json") + ": unreadable checkpoint (" + e.what() + ")");
  }
  if (!state.has("step") || !state.at("step").is_number()) throw std::runtime_error(join(found, "state.json") + ": missing integer 'step'");
  long long step = state.at("step").integer("step");
  Json expected = Json::parse(fingerprint_json(m, opt));
  Json recorded = state.has("fingerprint") ? state.at("fingerprint") : Json();
  if (expected != recorded) {
    std::string diff;
    for (const auto& [key, value] : expected.object("fingerprint"))
      if (!recorded.has(key) || recorded.at(key) != value) diff += (diff.empty() ? "" : ", ") + key;
    if (recorded.is_object())
      for (const auto& [key, value] : recorded.object("fingerprint"))
        if (!expected.has(key)) diff += (diff.empty() ? "" : ", ") + key;
    throw std::runtime_error(ckpt_dir + ": checkpoint is from another configuration (differs in " + diff + ")");
  }
  if (step < 0 || step > opt.steps) throw std::runtime_error(join(found, "state.json") + ": step " + std::to_string(step) + " out of range");
  program.set_adapter(read_adapter_safetensors(join(found, "adapter.safetensors"), m.adapter_numel));
  Resumed r;
  r.step = static_cast<int>(step);
  if (state.has("first_loss") && state.at("first_loss").is_number()) r.first_loss = state.at("first_loss").number("first_loss");
  return r;
}

}  // namespace

std::string train(PrgeProgram& program, const Manifest& m, const DataFile& data, const TrainOptions& opt,
                  const std::string& out_dir) {
  if (opt.steps < 1) throw std::runtime_error("--steps must be >= 1");
  if (opt.steps > data.steps)
    throw std::runtime_error("the data file holds the row order of " + std::to_string(data.steps) + " steps, not " +
                             std::to_string(opt.steps) + "; re-run `prge export-data --steps " + std::to_string(opt.steps) + "`");
  if (opt.seed != data.run_seed)
    throw std::runtime_error("--seed " + std::to_string(opt.seed) + " differs from the data file's run seed " +
                             std::to_string(data.run_seed) + " (it fixed the row order)");
  learning_rate(opt.schedule, opt.lr, 0, opt.steps);  // rejects an unknown schedule before any file is written
  make_dirs(out_dir);
  const int q = m.num_queries, b = m.batch_size, t = m.seq_len;
  const std::string ckpt_dir = join(out_dir, "ckpt");

  // config.json as the Python driver writes it, where it matters: `prge replay` rebuilds the
  // adapter of a native run from its log with the adapter layout recorded here.
  write_file_atomic(join(out_dir, "config.json"),
      "{\"engine\": \"native\", \"program\": " + quote(m.dir) + ", \"data\": " + quote(opt.data_path) +
      ", \"train\": {\"method\": \"prge\", \"steps\": " + std::to_string(opt.steps) + ", \"batch_size\": " + std::to_string(b) +
      ", \"lr\": " + format_double(opt.lr) + ", \"eps\": " + format_double(opt.eps) + ", \"schedule\": " + quote(opt.schedule) +
      ", \"seed\": " + std::to_string(opt.seed) + ", \"eval_every\": " + std::to_string(opt.eval_every) +
      ", \"checkpoint_every\": " + std::to_string(opt.checkpoint_every) + ", \"max_bad_steps\": " + std::to_string(opt.max_bad_steps) +
      ", \"diverge_factor\": " + format_double(opt.diverge_factor) + "}, \"base_model\": " + quote(m.model_path) +
      ", \"adapter_layout\": {\"numel\": " + std::to_string(m.adapter_numel) + ", \"slots\": " +
      m.raw.at("adapter").at("slots").dump() + ", \"initial\": \"zeros\"}}\n");
  // The runtime starts mutable buffers at zero; make the initial state explicit anyway.
  program.set_adapter(std::vector<float>(size_t(m.adapter_numel), 0.0f));
  Resumed resumed = opt.resume ? resume_from(program, m, opt, ckpt_dir) : Resumed{};
  const int start = resumed.step;
  double first_loss = resumed.first_loss;

  MetricsLog metrics(join(out_dir, "metrics.jsonl"), start);
  const auto started = Clock::now();
  double last_accuracy = NAN;
  auto eval_due = [&](int done) { return (opt.eval_every > 0 && done % opt.eval_every == 0) || done == opt.steps; };
  auto run_eval = [&](int done) {
    EvalResult r = evaluate(program, m, data.validation);
    last_accuracy = r.accuracy;
    metrics.write("{\"type\": \"eval\", \"step\": " + std::to_string(done) + ", \"split\": \"validation\", \"accuracy\": " +
                  format_double(r.accuracy) + ", \"loss\": " + format_double(r.loss) + "}");
    if (!opt.quiet) std::fprintf(stderr, "step %d: validation accuracy %.4f loss %.4f\n", done, r.accuracy, r.loss);
  };
  if (start == 0 && opt.eval_every > 0) run_eval(0);  // the zero-shot baseline on the same rows

  int64_t prev_seed = 0;
  std::vector<double> prev_g(size_t(q), 0.0);
  double prev_lr = 0.0;
  int bad_in_a_row = 0, bad_total = 0;
  std::vector<double> step_ms;
  std::vector<int64_t> ids(size_t(b) * t), mask(size_t(b) * t), labels(static_cast<size_t>(b));
  for (int step = start; step < opt.steps; ++step) {
    int64_t seed = step_seed(opt.seed, uint64_t(step));
    double lr = learning_rate(opt.schedule, opt.lr, step, opt.steps);
    for (int i = 0; i < b; ++i) {
      int row = data.order[size_t(step) * b + i];
      std::copy_n(data.train.ids.begin() + size_t(row) * t, t, ids.begin() + size_t(i) * t);
      std::copy_n(data.train.mask.begin() + size_t(row) * t, t, mask.begin() + size_t(i) * t);
      labels[size_t(i)] = data.train.labels[size_t(row)];
    }
    auto began = Clock::now();
    std::vector<float> losses = program.train_step(ids, mask, labels, prev_seed, seed, prev_g, prev_lr, opt.eps);
    step_ms.push_back(ms_since(began));

    double mean_loss = 0;
    for (float x : losses) mean_loss += double(x);
    mean_loss /= double(losses.size());
    std::string fault = loss_fault(losses, mean_loss, first_loss, opt.diverge_factor);
    if (std::isnan(first_loss) && fault.empty()) first_loss = mean_loss;
    std::vector<double> g(size_t(q), 0.0);
    std::string row = "{\"type\": \"train\", \"step\": " + std::to_string(step) + ", \"seed\": " + std::to_string(seed) +
                      ", \"lr\": " + format_double(lr) + ", \"eps\": " + format_double(opt.eps);
    if (fault.empty()) {
      for (int i = 0; i < q; ++i) g[size_t(i)] = (double(losses[size_t(i)]) - double(losses[size_t(i + q)])) / (2.0 * opt.eps);
      bad_in_a_row = 0;
    } else {  // a numerical fault: skip this step's update rather than poison B
      ++bad_in_a_row;
      ++bad_total;
      row += ", \"fault\": " + quote(fault);
    }
    std::vector<double> losses_d(losses.begin(), losses.end());
    row += ", \"g\": " + number_list(g) + ", \"losses\": " + number_list(losses_d) +
           ", \"step_ms\": " + format_double(round_to(step_ms.back(), 3)) +
           ", \"time\": " + format_double(round_to(ms_since(started) / 1000.0, 4)) + "}";
    metrics.write(row);
    if (bad_in_a_row >= opt.max_bad_steps)
      throw std::runtime_error(std::to_string(bad_in_a_row) + " steps in a row had a " + fault + " (last at step " +
                               std::to_string(step) + "); lower --lr or --eps. The last checkpoint (" + ckpt_dir + ") is intact.");
    reached("after-step", step);
    prev_seed = seed;
    prev_g = g;
    prev_lr = lr;
    int done = step + 1;
    bool ckpt_due = opt.checkpoint_every > 0 && done % opt.checkpoint_every == 0;
    if (eval_due(done) || ckpt_due || done == opt.steps) {
      program.apply_update(prev_seed, prev_g, prev_lr);  // the adapter evaluated or saved is the current one
      std::fill(prev_g.begin(), prev_g.end(), 0.0);
    }
    if (eval_due(done)) run_eval(done);
    // No checkpoint during a fault streak: the last one stays the last good state.
    if ((ckpt_due || (opt.checkpoint_every > 0 && done == opt.steps)) && bad_in_a_row == 0) {
      std::string state = "{\"step\": " + std::to_string(done) + ", \"next_seed\": " + std::to_string(step_seed(opt.seed, uint64_t(done))) +
                          ", \"data_position\": " + std::to_string(long(done) * b) +
                          ", \"first_loss\": " + format_double(first_loss) + ", \"fingerprint\": " + fingerprint_json(m, opt) + "}\n";
      save_checkpoint(ckpt_dir, program.get_adapter(), state, done);
    }
  }

  std::vector<float> adapter = program.get_adapter();
  write_file_atomic(join(out_dir, "adapter.safetensors"), encode_adapter_safetensors(adapter));
  double median = NAN;
  if (!step_ms.empty()) {  // torch.median: the lower middle value
    std::vector<double> sorted = step_ms;
    std::sort(sorted.begin(), sorted.end());
    median = sorted[(sorted.size() - 1) / 2];
  }
  std::string summary = "{\"engine\": \"native\", \"method\": \"prge\", \"steps_run\": " + std::to_string(opt.steps - start) +
                        ", \"bad_steps\": " + std::to_string(bad_total) + ", \"median_step_ms\": " + format_double(median) +
                        ", \"last_validation_accuracy\": " + format_double(last_accuracy) +
                        ", \"wall_s\": " + format_double(ms_since(started) / 1000.0) + "}";
  write_file_atomic(join(out_dir, "summary.json"), summary + "\n");
  return summary;
}

}  // namespace prge
