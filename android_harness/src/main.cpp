// prge-native: P-RGE fine-tuning from an exported program, with no Python and no PyTorch.
//
//   prge-native --program DIR --data FILE --out RUN [--steps N] [--lr X] [--eps X] ...
//
// Every failure a user can cause (missing or truncated files, a manifest or data file for
// another program, a bad option) ends in one "prge-native: error: ..." line and exit code 2.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include <executorch/runtime/platform/platform.h>

#include "data_file.hpp"
#include "manifest.hpp"
#include "program.hpp"
#include "train_loop.hpp"

namespace {

bool show_runtime_info = false;  // --verbose

// The runtime's log lines on stderr, as its default does, but its Info and Debug lines (the
// cpuinfo probing, the thread pool size: nothing a user can act on) only with --verbose.
void emit_runtime_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
                      const char* message, size_t length) {
  if (!show_runtime_info && (level == kInfo || level == kDebug)) return;
  std::fprintf(stderr, "%c executorch:%s:%zu] %.*s\n", static_cast<char>(level), filename, line, static_cast<int>(length), message);
}

const char* kUsage =
    "usage: prge-native --program DIR --data FILE --out DIR [options]\n"
    "  --program DIR          export folder from `prge export` (model.pte [+ model.ptd], manifest.json)\n"
    "  --data FILE            data file from `prge export-data` for that program\n"
    "  --out DIR              run directory: metrics.jsonl, ckpt/, adapter.safetensors, summary.json\n"
    "  --steps N              training steps (default: all the data file holds an order for)\n"
    "  --lr X, --eps X        learning rate and perturbation scale (default: the manifest's)\n"
    "  --schedule S           constant | linear (default constant)\n"
    "  --seed N               run seed; must equal the data file's (default: the data file's)\n"
    "  --eval-every N         validation eval every N steps, 0: only at the end (default 50)\n"
    "  --checkpoint-every N   checkpoint every N steps into OUT/ckpt, 0: never (default 0)\n"
    "  --max-bad-steps N      consecutive faulty steps before stopping (default 10)\n"
    "  --diverge-factor X     a mean loss above X times the run's baseline is a fault, 0: off (default 10)\n"
    "  --threads N            ExecuTorch thread pool size (default: the runtime's)\n"
    "  --resume               continue from OUT/ckpt\n"
    "  --no-verify            skip the sha256 check of the program files (faster start)\n"
    "  --quiet                no progress lines on stderr\n"
    "  --verbose              also the ExecuTorch runtime's informational log lines\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long long parse_int(const std::string& flag, const std::string& text, long long lo, long long hi) {
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < lo || v > hi)
    throw UsageError(flag + ": expected an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got '" + text + "'");
  return v;
}

double parse_positive(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0) || v > 1e6) throw UsageError(flag + ": expected a positive number, got '" + text + "'");
  return v;
}

double parse_nonnegative(const std::string& flag, const std::string& text) {
  return text == "0" ? 0.0 : parse_positive(flag, text);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string program_dir, data_path, out_dir;
    prge::TrainOptions opt;
    long long steps = -1, seed = -1, threads = 0;
    double lr = -1, eps = -1;
    bool verify = true;
    for (int i = 1; i < argc; ++i) {
      std::string flag = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw UsageError(flag + ": missing value");
        return argv[++i];
      };
      if (flag == "--program") program_dir = value();
      else if (flag == "--data") data_path = value();
      else if (flag == "--out") out_dir = value();
      else if (flag == "--steps") steps = parse_int(flag, value(), 1, 1 << 30);
      else if (flag == "--lr") lr = parse_positive(flag, value());
      else if (flag == "--eps") eps = parse_positive(flag, value());
      else if (flag == "--schedule") opt.schedule = value();
      else if (flag == "--seed") seed = parse_int(flag, value(), 0, 4294967295LL);
      else if (flag == "--eval-every") opt.eval_every = static_cast<int>(parse_int(flag, value(), 0, 1 << 30));
      else if (flag == "--checkpoint-every") opt.checkpoint_every = static_cast<int>(parse_int(flag, value(), 0, 1 << 30));
      else if (flag == "--max-bad-steps") opt.max_bad_steps = static_cast<int>(parse_int(flag, value(), 1, 1 << 30));
      else if (flag == "--diverge-factor") opt.diverge_factor = parse_nonnegative(flag, value());
      else if (flag == "--threads") threads = parse_int(flag, value(), 1, 1024);
      else if (flag == "--resume") opt.resume = true;
      else if (flag == "--no-verify") verify = false;
      else if (flag == "--quiet") opt.quiet = true;
      else if (flag == "--verbose") show_runtime_info = true;
      else if (flag == "--help" || flag == "-h") { std::fputs(kUsage, stdout); return 0; }
      else throw UsageError("unknown option '" + flag + "'");
    }
    if (program_dir.empty() || data_path.empty() || out_dir.empty()) throw UsageError("--program, --data and --out are required");
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_runtime_log, __FILE__));

    prge::Manifest manifest = prge::read_manifest(program_dir, verify);
    prge::DataFile data = prge::read_data_file(data_path, manifest);
    opt.data_path = data_path;
    opt.steps = steps > 0 ? static_cast<int>(steps) : data.steps;
    opt.seed = seed >= 0 ? static_cast<uint32_t>(seed) : data.run_seed;
    opt.lr = lr > 0 ? lr : manifest.default_lr;
    opt.eps = eps > 0 ? eps : manifest.default_eps;
    if (threads > 0) prge::set_runtime_threads(static_cast<unsigned>(threads));
    prge::PrgeProgram program(manifest);
    std::string summary = prge::train(program, manifest, data, opt, out_dir);
    std::printf("%s\n", summary.c_str());
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "prge-native: error: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prge-native: error: %s\n", e.what());
    return 2;
  }
}
