// prge-native-generate: greedy decoding with a generation program (`prge export --generate`) and a
// trained adapter, with no Python and no PyTorch.
//
//   prge-native-generate --program DIR --prompt-ids 1,2,3 [--adapter FILE] [--max-new-tokens N]
//
// Token ids in, token ids out: tokenizing stays with the caller (`prge generate --native BINARY`
// does it in Python and decodes what this prints). The adapter is the flat B safetensors file the
// native driver writes (RUN/adapter.safetensors; `prge generate --native` writes one from a PEFT
// folder). Prints one JSON line: the tokens, the prefill time and the decode speed. Failures: one "prge-native-generate: error: ..." line,
// exit code 2.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "options.hpp"
#include "program.hpp"
#include "safetensors.hpp"

namespace {

const char* kUsage =
    "usage: prge-native-generate --program DIR --prompt-ids IDS [options]\n"
    "  --program DIR          generation program from `prge export --generate`\n"
    "  --prompt-ids IDS       the prompt's token ids, comma-separated (the first ones are cut to fit the prefill window)\n"
    "  --adapter FILE         flat adapter safetensors (key \"adapter\"), e.g. a native run's adapter.safetensors\n"
    "                         (default: none, B = 0: the base model)\n"
    "  --max-new-tokens N     stop after N tokens (default 64; also stops at an end token or a full cache)\n"
    "  --threads N            ExecuTorch thread pool size (default: the runtime's)\n"
    "  --no-verify            skip the sha256 check of the program files\n"
    "  --verbose              also the ExecuTorch runtime's informational log lines\n";

std::vector<int64_t> parse_ids(const std::string& text, long long vocab) {
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    ids.push_back(prge::parse_int("--prompt-ids", item, 0, vocab - 1));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return ids;
}

size_t argmax(const std::vector<float>& logits) {
  return static_cast<size_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

struct Generation {
  std::vector<int64_t> tokens;
  double prefill_s = 0, decode_s = 0;
};

// As runtime_driver/generate.py CachedGenerator.greedy: the k-th new token comes from the decode
// call at position len(prompt) + k - 2; a stop token ends the generation and is not returned.
Generation greedy(prge::GenerationProgram& program, const prge::GenerationManifest& m, const std::vector<int64_t>& prompt,
                  long long max_new_tokens) {
  using clock = std::chrono::steady_clock;
  Generation g;
  auto began = clock::now();
  std::vector<float> logits = program.prefill(prompt);
  g.prefill_s = std::chrono::duration<double>(clock::now() - began).count();
  const long long limit = std::min<long long>(max_new_tokens, m.cache_len - static_cast<long long>(prompt.size()) + 1);
  began = clock::now();
  while (static_cast<long long>(g.tokens.size()) < limit) {
    int64_t token = static_cast<int64_t>(argmax(logits));
    if (std::find(m.eos_token_ids.begin(), m.eos_token_ids.end(), token) != m.eos_token_ids.end()) break;
    g.tokens.push_back(token);
    if (static_cast<long long>(g.tokens.size()) < limit)
      logits = program.decode(token, static_cast<int64_t>(prompt.size() + g.tokens.size()) - 1);
  }
  g.decode_s = std::chrono::duration<double>(clock::now() - began).count();
  return g;
}

}  // namespace

int main(int argc, char** argv) {
  return prge::run_tool("prge-native-generate", kUsage, [&]() -> int {
    std::string program_dir, adapter_path, prompt_text;
    long long max_new_tokens = 64, threads = 0;
    bool verify = true, verbose = false;
    for (prge::ArgWalker args(argc, argv); args.next();) {
      const std::string& flag = args.flag;
      auto value = [&] { return args.value(); };
      if (flag == "--program") program_dir = value();
      else if (flag == "--adapter") adapter_path = value();
      else if (flag == "--prompt-ids") prompt_text = value();
      else if (flag == "--max-new-tokens") max_new_tokens = prge::parse_int(flag, value(), 1, 1 << 20);
      else if (flag == "--threads") threads = prge::parse_int(flag, value(), 1, 1024);
      else if (flag == "--no-verify") verify = false;
      else if (flag == "--verbose") verbose = true;
      else if (flag == "--help" || flag == "-h") { std::fputs(kUsage, stdout); return 0; }
      else throw prge::UsageError("unknown option '" + flag + "'");
    }
    if (program_dir.empty() || prompt_text.empty()) throw prge::UsageError("--program and --prompt-ids are required");
    prge::filter_runtime_logs(verbose);
    prge::GenerationManifest manifest = prge::read_generation_manifest(program_dir, verify);
    std::vector<int64_t> prompt = parse_ids(prompt_text, manifest.vocab_size);
    size_t cut = prompt.size() > static_cast<size_t>(manifest.seq_len) ? prompt.size() - manifest.seq_len : 0;
    prompt.erase(prompt.begin(), prompt.begin() + static_cast<long>(cut));  // the prompt's start goes, as in training
    if (threads > 0) prge::set_runtime_threads(static_cast<unsigned>(threads));
    prge::GenerationProgram program(manifest);
    program.set_adapter(adapter_path.empty() ? std::vector<float>(manifest.adapter_numel, 0.0f)
                                             : prge::read_adapter_safetensors(adapter_path, manifest.adapter_numel));
    Generation g = greedy(program, manifest, prompt, max_new_tokens);
    std::string tokens;
    for (size_t i = 0; i < g.tokens.size(); ++i) tokens += (i ? "," : "") + std::to_string(g.tokens[i]);
    size_t decode_calls = g.tokens.empty() ? 0 : g.tokens.size() - 1;
    std::string rate = decode_calls > 0 && g.decode_s > 0 ? std::to_string(static_cast<double>(decode_calls) / g.decode_s) : "null";
    std::printf("{\"tokens\": [%s], \"prompt_tokens\": %zu, \"prompt_cut_tokens\": %zu, \"prefill_s\": %.6f, "
                "\"decode_s\": %.6f, \"decode_tokens_per_s\": %s}\n",
                tokens.c_str(), prompt.size(), cut, g.prefill_s, g.decode_s, rate.c_str());
    return 0;
  });
}
