#include "manifest.hpp"

#include <sys/stat.h>

#include "checksums.hpp"
#include "contract.hpp"
#include "files.hpp"

namespace prge {
namespace {

long long file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<long long>(st.st_size) : -1;
}

void verify_entry(const std::string& dir, const Json& entry, const std::string& path) {
  if (!is_file(path)) throw std::runtime_error(path + ": missing (listed in manifest.json)");
  long long bytes = entry.at("bytes").integer("bytes");
  if (file_size(path) != bytes || sha256_file_hex(path) != entry.at("sha256").string("sha256"))
    throw std::runtime_error(path + ": does not match manifest.json (size or sha256 differ): truncated, corrupted "
                             "or from another export");
  (void)dir;
}

// A bare file name inside the export folder: a manifest never points outside it.
std::string file_name(const Json& entry, const std::string& what) {
  const std::string& name = entry.at("file").string(what);
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    throw JsonError(what + ": expected a file name inside the export folder, got '" + name + "'");
  return name;
}

int positive_int(const Json& j, const std::string& what) {
  long long v = j.integer(what);
  if (v < 1 || v > (1 << 30)) throw JsonError(what + ": expected a positive integer");
  return static_cast<int>(v);
}

// The slots exactly as Python's json.dumps(slots_to_json(slots)) prints them (key order of
// export/contract/manifest.py slots_to_json), hashed: checkpoints record it to tie B to its layout.
std::string layout_hash(const Json& slots, long long numel) {
  long long tiled = 0;  // the slots must tile the flat adapter exactly
  std::string text = "[";
  bool first = true;
  for (const Json& s : slots.array("adapter.slots")) {
    const auto& shape = s.at("shape").array("slot.shape");
    if (shape.size() != 2) throw JsonError("adapter.slots: a shape is not [out, rank]");
    if (s.at("offset").integer("slot.offset") != tiled)
      throw JsonError("adapter.slots: " + s.at("name").string("slot.name") + " does not start where the previous slot ends");
    tiled += shape[0].integer("shape") * shape[1].integer("shape");
    text += std::string(first ? "" : ", ") + "{\"name\": " + quote(s.at("name").string("slot.name")) +
            ", \"shape\": [" + std::to_string(shape[0].integer("shape")) + ", " + std::to_string(shape[1].integer("shape")) +
            "], \"offset\": " + std::to_string(s.at("offset").integer("slot.offset")) +
            ", \"in_features\": " + std::to_string(s.at("in_features").integer("slot.in_features")) +
            ", \"a_stream\": " + std::to_string(s.at("a_stream").integer("slot.a_stream")) + "}";
    first = false;
  }
  if (tiled != numel) throw JsonError("adapter.numel: " + std::to_string(numel) + ", but the slots hold " + std::to_string(tiled));
  return sha256_hex(text + "]").substr(0, 16);
}

std::vector<int32_t> int_list(const Json& j, const std::string& what) {
  std::vector<int32_t> out;
  for (const Json& x : j.array(what)) out.push_back(static_cast<int32_t>(x.integer(what)));
  return out;
}

std::string dims_text(const std::vector<int32_t>& sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// The manifest's contract of one method: the same inputs (names, dtypes, order) and output as
// contract.hpp, with the shapes its named dimensions give for this manifest.
MethodShapes check_method(const Json& entry, const contract::Method& spec, const std::map<std::string, int>& dims) {
  auto resolve = [&](const contract::Arg& arg) {
    std::vector<int32_t> sizes;
    for (const auto& d : arg.dims) sizes.push_back(dims.count(d) ? dims.at(d) : std::stoi(d));
    return sizes;
  };
  auto check = [&](const Json& got, const contract::Arg& want, const std::string& where) {
    std::vector<int32_t> shape = int_list(got.at("shape"), where + ".shape");
    if (got.at("name").string(where + ".name") != want.name || got.at("dtype").string(where + ".dtype") != want.dtype ||
        shape != resolve(want))
      throw JsonError(where + ": " + got.dump() + ", but this driver's contract says " + want.name + " " + want.dtype + " " +
                      dims_text(resolve(want)));
    return shape;
  };
  const std::string where = "contract.methods." + spec.name;
  const auto& inputs = entry.at("inputs").array(where + ".inputs");
  if (inputs.size() != spec.inputs.size())
    throw JsonError(where + ": " + std::to_string(inputs.size()) + " inputs, this driver's contract has " +
                    std::to_string(spec.inputs.size()));
  MethodShapes shapes;
  for (size_t i = 0; i < inputs.size(); ++i) {
    shapes.inputs.push_back(check(inputs[i], spec.inputs[i], where + ".inputs[" + std::to_string(i) + "]"));
    shapes.dtypes.push_back(spec.inputs[i].dtype);
  }
  shapes.output = check(entry.at("output"), spec.output, where + ".output");
  return shapes;
}

std::string manifest_path(const std::string& program_dir) {
  std::string path = join(program_dir, "manifest.json");
  if (!is_file(path)) throw std::runtime_error(path + ": not found (is this a `prge export` output folder?)");
  return path;
}

// The versions this driver reads and the program's kind ("training" when absent: every program
// from before generation programs).
std::string check_versions(const Json& j) {
  if (j.at("manifest_version").integer("manifest_version") != contract::kManifestVersion)
    throw JsonError("manifest version " + j.at("manifest_version").dump() + ", this driver reads " +
                    std::to_string(contract::kManifestVersion));
  if (j.at("contract").at("version").integer("contract.version") != contract::kVersion)
    throw JsonError("contract version " + j.at("contract").at("version").dump() + ": this driver runs programs of contract " +
                    std::to_string(contract::kVersion) + "; re-export the program or rebuild the driver");
  return j.has("kind") ? j.at("kind").string("kind") : "training";
}

void read_program_paths(const Json& j, const std::string& program_dir, std::string& pte_path, std::string& ptd_path) {
  const Json& program = j.at("program");
  pte_path = join(program_dir, file_name(program.at("pte"), "program.pte.file"));
  if (program.has("ptd") && !program.at("ptd").is_null())
    ptd_path = join(program_dir, file_name(program.at("ptd"), "program.ptd.file"));
}

void verify_program_files(const std::string& program_dir, const Json& j, const std::string& pte_path,
                          const std::string& ptd_path) {
  verify_entry(program_dir, j.at("program").at("pte"), pte_path);
  if (!ptd_path.empty()) verify_entry(program_dir, j.at("program").at("ptd"), ptd_path);
}

}  // namespace

Manifest read_manifest(const std::string& program_dir, bool verify_files) {
  std::string path = manifest_path(program_dir);
  Manifest m;
  m.dir = program_dir;
  try {
    m.raw = Json::parse(read_text(path));
    const Json& j = m.raw;
    std::string kind = check_versions(j);
    if (kind == "generation")
      throw JsonError("kind: a generation program, which trains nothing (run it with prge-native-generate)");
    if (kind != "training")  // first-order and full-parameter programs run from Python (`prge train`) only
      throw JsonError("kind: a " + kind + " program; the native driver trains P-RGE programs (`prge export`)");
    // A completion program's labels are per-position targets and eval_losses replaces eval_logits.
    m.completion = j.at("task").at("loss").string("task.loss") == "completion";
    const auto& table = m.completion ? contract::completion_training_methods() : contract::training_methods();
    read_program_paths(j, program_dir, m.pte_path, m.ptd_path);
    m.pte_sha256 = j.at("program").at("pte").at("sha256").string("program.pte.sha256");
    std::vector<std::string> methods;
    for (const Json& name : j.at("methods").array("methods")) methods.push_back(name.string("methods[]"));
    for (const auto& spec : table) {
      bool found = false;
      for (const auto& have : methods) found = found || have == spec.name;
      if (!found)
        throw JsonError("methods: no '" + spec.name + "', which a " + (m.completion ? "completion" : "label-word") +
                        " training program has");
    }
    const Json& shapes = j.at("shapes");
    m.batch_size = positive_int(shapes.at("batch_size"), "shapes.batch_size");
    m.seq_len = positive_int(shapes.at("seq_len"), "shapes.seq_len");
    m.eval_batch_size = positive_int(shapes.at("eval_batch_size"), "shapes.eval_batch_size");
    m.num_queries = positive_int(j.at("num_queries"), "num_queries");
    m.adapter_numel = positive_int(j.at("adapter").at("numel"), "adapter.numel");
    m.vocab_size = positive_int(shapes.at("vocab_size"), "shapes.vocab_size");
    m.num_labels = static_cast<int>(j.at("task").at("label_token_ids").array("task.label_token_ids").size());
    if (!m.completion && m.num_labels < 2) throw JsonError("task.label_token_ids: need at least 2 labels");
    m.model_path = j.at("model").at("path").string("model.path");
    m.prng_version = j.at("prng_version").string("prng_version");
    if (j.has("estimator")) {
      const Json& e = j.at("estimator");
      m.estimator = e.at("name").string("estimator.name");
      m.noise = e.at("noise").string("estimator.noise");
      m.normalize = e.at("normalize").boolean("estimator.normalize");
    }
    m.adapter_layout = layout_hash(j.at("adapter").at("slots"), m.adapter_numel);
    const std::map<std::string, int> dims = {
        {"batch", m.batch_size}, {"seq_len", m.seq_len}, {"eval_batch", m.eval_batch_size}, {"num_queries", m.num_queries},
        {"2q", 2 * m.num_queries}, {"adapter_numel", static_cast<int>(m.adapter_numel)}, {"num_labels", m.num_labels},
        {"vocab", m.vocab_size}};
    for (const auto& spec : table) {
      MethodShapes checked = check_method(j.at("contract").at("methods").at(spec.name), spec, dims);
      // Checked, not loaded: this driver decodes nothing (its arena would only cost memory).
      if (spec.name != "next_token_logits") m.methods[spec.name] = checked;
    }
    const Json& defaults = j.at("defaults");
    if (defaults.has("lr")) m.default_lr = defaults.at("lr").number("defaults.lr");
    if (defaults.has("eps")) m.default_eps = defaults.at("eps").number("defaults.eps");
  } catch (const JsonError& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  if (verify_files) verify_program_files(program_dir, m.raw, m.pte_path, m.ptd_path);
  return m;
}

GenerationManifest read_generation_manifest(const std::string& program_dir, bool verify_files) {
  std::string path = manifest_path(program_dir);
  GenerationManifest m;
  Json j;
  try {
    j = Json::parse(read_text(path));
    if (check_versions(j) != "generation")
      throw JsonError("kind: not a generation program (export one with `prge export --generate`)");
    read_program_paths(j, program_dir, m.pte_path, m.ptd_path);
    const Json& shapes = j.at("shapes");
    m.seq_len = positive_int(shapes.at("seq_len"), "shapes.seq_len");
    m.cache_len = positive_int(shapes.at("cache_len"), "shapes.cache_len");
    m.vocab_size = positive_int(shapes.at("vocab_size"), "shapes.vocab_size");
    if (m.cache_len <= m.seq_len) throw JsonError("shapes.cache_len: must exceed seq_len (the prefill window)");
    m.adapter_numel = positive_int(j.at("adapter").at("numel"), "adapter.numel");
    layout_hash(j.at("adapter").at("slots"), m.adapter_numel);  // the slots tile the flat adapter
    const Json& tokenizer = j.at("tokenizer");
    m.pad_token_id = tokenizer.at("pad_token_id").integer("tokenizer.pad_token_id");
    for (const Json& id : tokenizer.at("eos_token_ids").array("tokenizer.eos_token_ids"))
      m.eos_token_ids.push_back(id.integer("tokenizer.eos_token_ids[]"));
    const std::map<std::string, int> dims = {
        {"seq_len", m.seq_len}, {"vocab", m.vocab_size}, {"adapter_numel", static_cast<int>(m.adapter_numel)}};
    for (const auto& spec : contract::generation_methods())
      m.methods[spec.name] = check_method(j.at("contract").at("methods").at(spec.name), spec, dims);
  } catch (const JsonError& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  if (verify_files) verify_program_files(program_dir, j, m.pte_path, m.ptd_path);
  return m;
}

}  // namespace prge
