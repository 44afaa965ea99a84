#include "checkpoint.hpp"

#include <stdexcept>

#include "failpoints.hpp"
#include "files.hpp"
#include "json.hpp"
#include "metrics.hpp"
#include "safetensors.hpp"

namespace prge {
namespace {

// The complete checkpoint to resume from: ckpt/, or the old copy a kill between the two
// renames of save_checkpoint left aside.
std::string find_checkpoint_dir(const std::string& ckpt_dir) {
  if (is_file(join(ckpt_dir, "state.json"))) return ckpt_dir;
  for (const auto& old : moved_aside(ckpt_dir))
    if (is_file(join(old, "state.json"))) return old;
  return "";
}

}  // namespace

std::string fingerprint_json(const Manifest& m, const TrainOptions& opt) {
  return "{\"method\": \"prge\", \"steps\": " + std::to_string(opt.steps) +
         ", \"batch_size\": " + std::to_string(m.batch_size) + ", \"lr\": " + format_double(opt.lr) +
         ", \"eps\": " + format_double(opt.eps) + ", \"schedule\": " + quote(opt.schedule) +
         ", \"seed\": " + std::to_string(opt.seed) + ", \"optimizer\": \"sgd\", \"model\": " + quote(m.model_path) +
         ", \"seq_len\": " + std::to_string(m.seq_len) + ", \"adapter_layout\": " + quote(m.adapter_layout) +
         ", \"program_sha256\": " + quote(m.pte_sha256) + ", \"num_queries\": " + std::to_string(m.num_queries) +
         ", \"estimator\": " + quote(m.estimator) + ", \"prng\": " + quote(m.prng_version) + "}";
}

std::string checkpoint_state(int done, int64_t next_seed, long long data_position, const std::vector<double>& baseline_losses,
                             const std::string& fingerprint) {
  return "{\"step\": " + std::to_string(done) + ", \"next_seed\": " + std::to_string(next_seed) +
         ", \"data_position\": " + std::to_string(data_position) + ", \"baseline_losses\": " + number_list(baseline_losses) +
         ", \"fingerprint\": " + fingerprint + "}\n";
}

void save_checkpoint(const std::string& ckpt_dir, const std::vector<float>& adapter, const std::string& state, long step) {
  replace_dir_atomically(
      ckpt_dir,
      [&](const std::string& tmp) {
        write_file_synced(join(tmp, "adapter.safetensors"), encode_adapter_safetensors(adapter));
        write_file_synced(join(tmp, "state.json"), state);
      },
      [&] { reached("ckpt-tmp-written", step); }, [&] { reached("ckpt-old-moved", step); });
}

ResumePoint load_resume_point(const Manifest& m, const TrainOptions& opt, const std::string& ckpt_dir) {
  ResumePoint r;
  std::string found = find_checkpoint_dir(ckpt_dir);
  if (found.empty()) return r;
  const std::string state_path = join(found, "state.json");
  Json state;
  try {
    state = Json::parse(read_text(state_path));
  } catch (const JsonError& e) {
    throw std::runtime_error(state_path + ": unreadable checkpoint (" + e.what() + ")");
  }
  if (!state.has("step") || !state.at("step").is_number()) throw std::runtime_error(state_path + ": missing integer 'step'");
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
  if (step < 0 || step > opt.steps) throw std::runtime_error(state_path + ": step " + std::to_string(step) + " out of range");
  try {
    if (state.has("baseline_losses"))
      for (const Json& x : state.at("baseline_losses").array("baseline_losses")) r.baseline_losses.push_back(x.number("baseline_losses[]"));
  } catch (const JsonError& e) {
    throw std::runtime_error(state_path + ": " + e.what());
  }
  r.adapter = read_adapter_safetensors(join(found, "adapter.safetensors"), m.adapter_numel);
  r.found = true;
  r.step = static_cast<int>(step);
  return r;
}

}  // namespace prge
