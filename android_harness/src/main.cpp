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

#include "data_file.hpp"
#include "manifest.hpp"
#include "options.hpp"
#include "program.hpp"
#include "train_loop.hpp"

namespace {

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

}  // namespace

int main(int argc, char** argv) {
  return prge::run_tool("prge-native", kUsage, [&]() -> int {
    std::string program_dir, data_path, out_dir;
    prge::TrainOptions opt;
    long long steps = -1, seed = -1, threads = 0;
    double lr = -1, eps = -1;
    bool verify = true, verbose = false;
    for (prge::ArgWalker args(argc, argv); args.next();) {
      const std::string& flag = args.flag;
      auto value = [&] { return args.value(); };
      if (flag == "--program") program_dir = value();
      else if (flag == "--data") data_path = value();
      else if (flag == "--out") out_dir = value();
      else if (flag == "--steps") steps = prge::parse_int(flag, value(), 1, 1 << 30);
      else if (flag == "--lr") lr = prge::parse_positive(flag, value());
      else if (flag == "--eps") eps = prge::parse_positive(flag, value());
      else if (flag == "--schedule") opt.schedule = value();
      else if (flag == "--seed") seed = prge::parse_int(flag, value(), 0, 4294967295LL);
      else if (flag == "--eval-every") opt.eval_every = static_cast<int>(prge::parse_int(flag, value(), 0, 1 << 30));
      else if (flag == "--checkpoint-every") opt.checkpoint_every = static_cast<int>(prge::parse_int(flag, value(), 0, 1 << 30));
      else if (flag == "--max-bad-steps") opt.max_bad_steps = static_cast<int>(prge::parse_int(flag, value(), 1, 1 << 30));
      else if (flag == "--diverge-factor") opt.diverge_factor = prge::parse_nonnegative(flag, value());
      else if (flag == "--threads") threads = prge::parse_int(flag, value(), 1, 1024);
      else if (flag == "--resume") opt.resume = true;
      else if (flag == "--no-verify") verify = false;
      else if (flag == "--quiet") opt.quiet = true;
      else if (flag == "--verbose") verbose = true;
      else if (flag == "--help" || flag == "-h") { std::fputs(kUsage, stdout); return 0; }
      else throw prge::UsageError("unknown option '" + flag + "'");
    }
    if (program_dir.empty() || data_path.empty() || out_dir.empty()) throw prge::UsageError("--program, --data and --out are required");
    prge::filter_runtime_logs(verbose);

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
  });
}
