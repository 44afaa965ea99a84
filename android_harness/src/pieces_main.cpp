// prge-native-pieces: the native driver's loop pieces as a filter, so tests can hold each one
// against its Python twin case by case (tests/android_harness/test_native_pieces.py). One JSON
// object a line in, one a line out:
//   {"piece": "judge", "eps": X, "normalize": B, "diverge_factor": X, "num_labels": N, "max_bad_steps": N,
//    "losses_bits": [[u32, ...], ...]}   (each step's 2q float32 losses as their bit patterns,
//                                         so NaN and infinities travel exactly)
//     -> {"verdicts": [{"g": [...], "fault": "...", "mean_loss": X|null, "must_stop": bool}, ...],
//         "baseline_losses": [...]}
//   {"piece": "due", "steps": N, "eval_every": N, "checkpoint_every": N}
//     -> {"due": [[eval, checkpoint], ...]} after 1..steps steps
//   {"piece": "step_seed", "run_seed": N, "steps": N} -> {"seeds": [...]}
//   {"piece": "learning_rate", "schedule": S, "lr": X, "steps": N} -> {"lrs": [...]}
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "judge.hpp"
#include "json.hpp"
#include "metrics.hpp"
#include "schedule.hpp"

namespace {

using prge::Json;

std::string run_judge(const Json& in) {
  prge::StepJudge judge(in.at("eps").number("eps"), in.has("normalize") && in.at("normalize").boolean("normalize"),
                        in.at("diverge_factor").number("diverge_factor"),
                        static_cast<int>(in.at("num_labels").integer("num_labels")),
                        static_cast<int>(in.at("max_bad_steps").integer("max_bad_steps")));
  std::string out = "{\"verdicts\": [";
  bool first = true;
  for (const Json& step : in.at("losses_bits").array("losses_bits")) {
    std::vector<float> losses;
    for (const Json& bits : step.array("losses_bits[]")) {
      uint32_t u = static_cast<uint32_t>(bits.integer("bits"));
      float f;
      std::memcpy(&f, &u, sizeof f);
      losses.push_back(f);
    }
    prge::Verdict v = judge.judge(losses);
    out += std::string(first ? "" : ", ") + "{\"g\": " + prge::number_list(v.g) + ", \"fault\": " + prge::quote(v.fault) +
           ", \"mean_loss\": " + prge::format_double(v.mean_loss) + ", \"must_stop\": " + (judge.must_stop() ? "true" : "false") + "}";
    first = false;
  }
  return out + "], \"baseline_losses\": " + prge::number_list(judge.baseline_losses()) + "}";
}

std::string run_due(const Json& in) {
  const int steps = static_cast<int>(in.at("steps").integer("steps"));
  std::string out = "{\"due\": [";
  for (int done = 1; done <= steps; ++done) {
    prge::Due due = prge::due_after(done, steps, static_cast<int>(in.at("eval_every").integer("eval_every")),
                                    static_cast<int>(in.at("checkpoint_every").integer("checkpoint_every")));
    out += std::string(done > 1 ? ", " : "") + "[" + (due.eval ? "true" : "false") + ", " + (due.checkpoint ? "true" : "false") + "]";
  }
  return out + "]}";
}

std::string run_step_seed(const Json& in) {
  std::string out = "{\"seeds\": [";
  for (long long t = 0; t < in.at("steps").integer("steps"); ++t)
    out += (t ? ", " : "") + std::to_string(prge::step_seed(uint64_t(in.at("run_seed").integer("run_seed")), uint64_t(t)));
  return out + "]}";
}

std::string run_learning_rate(const Json& in) {
  const int steps = static_cast<int>(in.at("steps").integer("steps"));
  std::vector<double> lrs;
  for (int t = 0; t < steps; ++t)
    lrs.push_back(prge::learning_rate(in.at("schedule").string("schedule"), in.at("lr").number("lr"), t, steps));
  return "{\"lrs\": " + prge::number_list(lrs) + "}";
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    try {
      Json in = Json::parse(line);
      const std::string piece = in.at("piece").string("piece");
      if (piece == "judge") std::cout << run_judge(in) << "\n";
      else if (piece == "due") std::cout << run_due(in) << "\n";
      else if (piece == "step_seed") std::cout << run_step_seed(in) << "\n";
      else if (piece == "learning_rate") std::cout << run_learning_rate(in) << "\n";
      else throw std::runtime_error("unknown piece '" + piece + "'");
    } catch (const std::exception& e) {
      std::cerr << "prge-native-pieces: error: " << e.what() << "\n";
      return 2;
    }
  }
  return 0;
}
