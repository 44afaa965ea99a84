#include "program.hpp"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/platform.h>

// The wheel ships libexecutorch_threadpool.so but not its header; these two declarations match
// the exported symbols (executorch/extension/threadpool/threadpool.h upstream). Non-virtual
// members, so declaring only what is called is ABI-safe.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace prge {

using executorch::aten::ScalarType;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

constexpr int kLong = LoadedProgram::kLong, kFloat = LoadedProgram::kFloat;

std::string error_text(Error e) {
  return std::string(executorch::runtime::to_string(e)) + " (error " + std::to_string(static_cast<int>(e)) + ")";
}

std::string dims(const std::vector<int32_t>& sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// set_adapter of either kind of program: the flat B of the manifest's layout.
void set_flat_adapter(LoadedProgram& program, const std::vector<float>& flat, long long numel) {
  if (static_cast<long long>(flat.size()) != numel)
    throw std::runtime_error("adapter has " + std::to_string(flat.size()) + " values, this program's has " + std::to_string(numel));
  std::vector<float> copy = flat;
  program.run("set_adapter", {copy.data()}, {{static_cast<int32_t>(numel)}}, {kFloat}, size_t(numel));
}

bool show_runtime_info = false;

// The runtime's log lines on stderr, as its default does, but its Info and Debug lines (the
// cpuinfo probing, the thread pool size: nothing a user can act on) only when asked.
void emit_runtime_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
                      const char* message, size_t length) {
  if (!show_runtime_info && (level == kInfo || level == kDebug)) return;
  std::fprintf(stderr, "%c executorch:%s:%zu] %.*s\n", static_cast<char>(level), filename, line, static_cast<int>(length), message);
}

}  // namespace

void filter_runtime_logs(bool show_info) {
  show_runtime_info = show_info;
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_runtime_log, __FILE__));
}

void set_runtime_threads(unsigned threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr || !pool->_unsafe_reset_threadpool(threads))
    throw std::runtime_error("could not set the ExecuTorch thread pool to " + std::to_string(threads) + " threads");
}

// XNNPACK packs a delegate's weights into its own layout when a method loads; without its
// weight cache every method that runs the body (train_step, eval_logits) holds its own packed
// copy. With it, methods share one copy, keyed by the weights' names in the program. The key
// strings are XNNPACKBackend.h's (the wheel ships the library, not that header).
void enable_xnnpack_weight_cache() {
  executorch::runtime::BackendOptions<1> options;
  options.set_option("weight_cache_enabled", true);
  Error err = executorch::runtime::set_option("XnnpackBackend", options.view());
  if (err != Error::Ok) throw std::runtime_error("could not enable XNNPACK's weight cache: " + error_text(err));
}

LoadedProgram::LoadedProgram(const std::string& pte_path, const std::string& ptd_path,
                             const std::map<std::string, MethodShapes>& methods)
    : pte_path_(pte_path) {
  enable_xnnpack_weight_cache();
  // share_memory_arenas: the program was exported with share_mutable_buffers=True, so every
  // method must see the same adapter buffers (executorch-notes.md).
  // LoadMode::Mmap: the weights are mapped from the file instead of read into heap buffers; on
  // the default model's 8da8w program this took peak RSS from 573 to 417 MB (BENCHMARKS.md).
  if (ptd_path.empty())
    module_ = std::make_unique<Module>(pte_path, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, true);
  else
    module_ = std::make_unique<Module>(pte_path, ptd_path, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, true);
  Error err = module_->load(executorch::runtime::Program::Verification::InternalConsistency);
  if (err != Error::Ok) throw std::runtime_error(pte_path + ": ExecuTorch could not load the program: " + error_text(err));
  for (const auto& [name, shapes] : methods) {
    err = module_->load_method(name);
    if (err != Error::Ok)
      throw std::runtime_error(pte_path + ": ExecuTorch could not load method " + name + ": " + error_text(err));
    check_signature(name, shapes);
  }
}

LoadedProgram::~LoadedProgram() = default;

// A manifest copied next to another export's .pte would pass its own checks: every input and
// the output the program itself declares must have the dtype and shape the manifest's contract gives.
void LoadedProgram::check_signature(const std::string& method, const MethodShapes& expected) {
  auto meta = module_->method_meta(method);
  if (!meta.ok()) throw std::runtime_error(pte_path_ + ": no metadata for " + method);
  if (meta->num_inputs() != expected.inputs.size())
    throw std::runtime_error(pte_path_ + ": " + method + " takes " + std::to_string(meta->num_inputs()) +
                             " inputs, manifest.json's contract " + std::to_string(expected.inputs.size()));
  auto check = [&](auto info, const std::string& what, const std::string& dtype, const std::vector<int32_t>& shape) {
    if (!info.ok()) throw std::runtime_error(pte_path_ + ": " + method + " " + what + " is not a tensor");
    auto span = info->sizes();
    std::vector<int32_t> actual(span.begin(), span.end());
    std::string actual_dtype = info->scalar_type() == ScalarType::Long ? "int64"
                               : info->scalar_type() == ScalarType::Float ? "float32" : "another dtype";
    if (actual != shape || actual_dtype != dtype)
      throw std::runtime_error(pte_path_ + ": " + method + " " + what + " is " + actual_dtype + " " + dims(actual) +
                               " in the program, " + dtype + " " + dims(shape) + " by manifest.json (manifest from another export?)");
  };
  for (size_t i = 0; i < expected.inputs.size(); ++i)
    check(meta->input_tensor_meta(i), "input " + std::to_string(i), expected.dtypes[i], expected.inputs[i]);
  check(meta->output_tensor_meta(0), "output", "float32", expected.output);
}

std::vector<float> LoadedProgram::run(const std::string& method, std::vector<void*> data,
                                      std::vector<std::vector<int32_t>> sizes, std::vector<int> dtypes, size_t expect_numel) {
  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (size_t i = 0; i < data.size(); ++i) {
    std::vector<executorch::aten::SizesType> s(sizes[i].begin(), sizes[i].end());
    tensors.push_back(executorch::extension::from_blob(data[i], s, dtypes[i] == kLong ? ScalarType::Long : ScalarType::Float));
    inputs.emplace_back(*tensors.back());
  }
  auto result = module_->execute(method, inputs);
  if (!result.ok()) throw std::runtime_error(method + " failed in the ExecuTorch runtime: " + error_text(result.error()));
  const auto& outputs = result.get();
  if (outputs.empty() || !outputs[0].isTensor()) throw std::runtime_error(method + " returned no tensor");
  const auto& out = outputs[0].toTensor();
  if (out.scalar_type() != ScalarType::Float || static_cast<size_t>(out.numel()) != expect_numel)
    throw std::runtime_error(method + " returned " + std::to_string(out.numel()) + " values, expected " + std::to_string(expect_numel) + " float32");
  // Copy at once: with shared arenas the next execute may overwrite this output's memory.
  const float* p = out.const_data_ptr<float>();
  return std::vector<float>(p, p + expect_numel);
}

PrgeProgram::PrgeProgram(const Manifest& m) : m_(m), program_(m.pte_path, m.ptd_path, m.methods) {}

std::vector<float> PrgeProgram::train_step(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                           const std::vector<int64_t>& labels, int64_t prev_seed, int64_t new_seed,
                                           const std::vector<double>& prev_g, double lr, double eps) {
  const int b = m_.batch_size, t = m_.seq_len, q = m_.num_queries;
  // float32 as torch.tensor(..., dtype=float32) rounds the Python driver's doubles.
  std::vector<float> g(prev_g.begin(), prev_g.end());
  float lr_f = static_cast<float>(lr), eps_f = static_cast<float>(eps);
  int64_t prev = prev_seed, next = new_seed;
  std::vector<int32_t> label_shape = m_.completion ? std::vector<int32_t>{b, t} : std::vector<int32_t>{b};
  return program_.run("train_step",
             {const_cast<int64_t*>(ids.data()), const_cast<int64_t*>(mask.data()), const_cast<int64_t*>(labels.data()), &prev, &next,
              g.data(), &lr_f, &eps_f},
             {{b, t}, {b, t}, label_shape, {1}, {1}, {q}, {1}, {1}},
             {kLong, kLong, kLong, kLong, kLong, kFloat, kFloat, kFloat}, size_t(2 * q));
}

void PrgeProgram::apply_update(int64_t prev_seed, const std::vector<double>& prev_g, double lr) {
  std::vector<float> g(prev_g.begin(), prev_g.end());
  float lr_f = static_cast<float>(lr);
  int64_t prev = prev_seed;
  program_.run("apply_update", {&prev, g.data(), &lr_f}, {{1}, {m_.num_queries}, {1}}, {kLong, kFloat, kFloat}, size_t(m_.adapter_numel));
}

std::vector<float> PrgeProgram::eval_logits(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask) {
  const int e = m_.eval_batch_size, t = m_.seq_len;
  return program_.run("eval_logits", {const_cast<int64_t*>(ids.data()), const_cast<int64_t*>(mask.data())}, {{e, t}, {e, t}},
             {kLong, kLong}, size_t(e) * m_.num_labels);
}

std::vector<float> PrgeProgram::eval_losses(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                            const std::vector<int64_t>& targets) {
  const int e = m_.eval_batch_size, t = m_.seq_len;
  return program_.run("eval_losses",
             {const_cast<int64_t*>(ids.data()), const_cast<int64_t*>(mask.data()), const_cast<int64_t*>(targets.data())},
             {{e, t}, {e, t}, {e, t}}, {kLong, kLong, kLong}, size_t(e));
}

std::vector<float> PrgeProgram::get_adapter() { return program_.run("get_adapter", {}, {}, {}, size_t(m_.adapter_numel)); }

void PrgeProgram::set_adapter(const std::vector<float>& flat) {
  set_flat_adapter(program_, flat, m_.adapter_numel);
}

GenerationProgram::GenerationProgram(const GenerationManifest& m) : m_(m), program_(m.pte_path, m.ptd_path, m.methods) {}

std::vector<float> GenerationProgram::prefill(const std::vector<int64_t>& prompt) {
  if (prompt.empty() || static_cast<int>(prompt.size()) > m_.seq_len)
    throw std::runtime_error("a prompt of " + std::to_string(prompt.size()) + " tokens; this program prefills 1 to " +
                             std::to_string(m_.seq_len));
  // Right-padded: the pad tokens' cache entries sit past the prompt, where decode overwrites them.
  std::vector<int64_t> ids(m_.seq_len, m_.pad_token_id);
  std::copy(prompt.begin(), prompt.end(), ids.begin());
  int64_t length = static_cast<int64_t>(prompt.size());
  return program_.run("prefill", {ids.data(), &length}, {{1, m_.seq_len}, {1}}, {kLong, kLong}, size_t(m_.vocab_size));
}

std::vector<float> GenerationProgram::decode(int64_t token, int64_t position) {
  if (position < 0 || position >= m_.cache_len)
    throw std::runtime_error("position " + std::to_string(position) + " is outside the " + std::to_string(m_.cache_len) +
                             "-position cache");
  return program_.run("decode", {&token, &position}, {{1, 1}, {1}}, {kLong, kLong}, size_t(m_.vocab_size));
}

void GenerationProgram::set_adapter(const std::vector<float>& flat) { set_flat_adapter(program_, flat, m_.adapter_numel); }

}  // namespace prge
