// The program contract this driver is built for: the methods it calls, their inputs in order
// (name, dtype, named dimensions) and outputs, for training programs (label-word and completion)
// and for generation programs. The definition is export/contract/methods.py; the tables below
// must equal it (tests/android_harness/test_native_pieces.py renders them from the Python module
// and compares). A manifest whose contract differs is refused.
#pragma once

#include <string>
#include <vector>

namespace prge::contract {

constexpr int kVersion = 1;          // CONTRACT_VERSION
constexpr int kManifestVersion = 2;  // export/contract/manifest.py MANIFEST_VERSION

struct Arg {
  std::string name;
  std::string dtype;              // "int64" | "float32"
  std::vector<std::string> dims;  // batch, seq_len, eval_batch, num_queries, adapter_numel, num_labels, 2q, vocab, or a size
};

struct Method {
  std::string name;
  std::vector<Arg> inputs;
  Arg output;
};

// BEGIN TABLE (generated from export/contract/methods.py TRAINING_METHODS)
inline const std::vector<Method>& training_methods() {
  static const std::vector<Method> methods = {
      {"train_step",
       {{"input_ids", "int64", {"batch", "seq_len"}},
        {"attention_mask", "int64", {"batch", "seq_len"}},
        {"labels", "int64", {"batch"}},
        {"prev_seed", "int64", {"1"}},
        {"new_seed", "int64", {"1"}},
        {"prev_g", "float32", {"num_queries"}},
        {"lr", "float32", {"1"}},
        {"eps", "float32", {"1"}}},
       {"losses", "float32", {"2q"}}},
      {"apply_update",
       {{"prev_seed", "int64", {"1"}},
        {"prev_g", "float32", {"num_queries"}},
        {"lr", "float32", {"1"}}},
       {"adapter", "float32", {"adapter_numel"}}},
      {"eval_logits",
       {{"input_ids", "int64", {"eval_batch", "seq_len"}},
        {"attention_mask", "int64", {"eval_batch", "seq_len"}}},
       {"logits", "float32", {"eval_batch", "num_labels"}}},
      {"get_adapter",
       {},
       {"adapter", "float32", {"adapter_numel"}}},
      {"set_adapter",
       {{"flat", "float32", {"adapter_numel"}}},
       {"adapter", "float32", {"adapter_numel"}}},
  };
  return methods;
}
// END TABLE

// BEGIN TABLE (generated from export/contract/methods.py COMPLETION_TRAINING_METHODS, inputs_of(m, COMPLETION))
// A completion program's: labels are per-position targets, eval_losses replaces eval_logits.
inline const std::vector<Method>& completion_training_methods() {
  static const std::vector<Method> methods = {
      {"train_step",
       {{"input_ids", "int64", {"batch", "seq_len"}},
        {"attention_mask", "int64", {"batch", "seq_len"}},
        {"labels", "int64", {"batch", "seq_len"}},
        {"prev_seed", "int64", {"1"}},
        {"new_seed", "int64", {"1"}},
        {"prev_g", "float32", {"num_queries"}},
        {"lr", "float32", {"1"}},
        {"eps", "float32", {"1"}}},
       {"losses", "float32", {"2q"}}},
      {"apply_update",
       {{"prev_seed", "int64", {"1"}},
        {"prev_g", "float32", {"num_queries"}},
        {"lr", "float32", {"1"}}},
       {"adapter", "float32", {"adapter_numel"}}},
      {"eval_losses",
       {{"input_ids", "int64", {"eval_batch", "seq_len"}},
        {"attention_mask", "int64", {"eval_batch", "seq_len"}},
        {"labels", "int64", {"eval_batch", "seq_len"}}},
       {"losses", "float32", {"eval_batch"}}},
      {"next_token_logits",
       {{"input_ids", "int64", {"eval_batch", "seq_len"}},
        {"attention_mask", "int64", {"eval_batch", "seq_len"}}},
       {"logits", "float32", {"eval_batch", "vocab"}}},
      {"get_adapter",
       {},
       {"adapter", "float32", {"adapter_numel"}}},
      {"set_adapter",
       {{"flat", "float32", {"adapter_numel"}}},
       {"adapter", "float32", {"adapter_numel"}}},
  };
  return methods;
}
// END TABLE

// BEGIN TABLE (generated from export/contract/methods.py GENERATION_METHODS)
inline const std::vector<Method>& generation_methods() {
  static const std::vector<Method> methods = {
      {"prefill",
       {{"input_ids", "int64", {"1", "seq_len"}},
        {"length", "int64", {"1"}}},
       {"logits", "float32", {"1", "vocab"}}},
      {"decode",
       {{"token", "int64", {"1", "1"}},
        {"position", "int64", {"1"}}},
       {"logits", "float32", {"1", "vocab"}}},
      {"get_adapter",
       {},
       {"adapter", "float32", {"adapter_numel"}}},
      {"set_adapter",
       {{"flat", "float32", {"adapter_numel"}}},
       {"adapter", "float32", {"adapter_numel"}}},
  };
  return methods;
}
// END TABLE

}  // namespace prge::contract
