// Command-line pieces the native tools share: option values parsed with their flag in every
// error, and the one-error-line exit of a failed run.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

namespace prge {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline long long parse_int(const std::string& flag, const std::string& text, long long lo, long long hi) {
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < lo || v > hi)
    throw UsageError(flag + ": expected an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got '" + text + "'");
  return v;
}

inline double parse_positive(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0) || v > 1e6) throw UsageError(flag + ": expected a positive number, got '" + text + "'");
  return v;
}

inline double parse_nonnegative(const std::string& flag, const std::string& text) {
  return text == "0" ? 0.0 : parse_positive(flag, text);
}

// Walks a command line flag by flag: `for (ArgWalker args(argc, argv); args.next();)`, then
// args.flag is the flag and args.value() takes the word after it.
class ArgWalker {
 public:
  ArgWalker(int argc, char** argv) : argc_(argc), argv_(argv) {}
  bool next() {
    if (++index_ >= argc_) return false;
    flag = argv_[index_];
    return true;
  }
  std::string value() {
    if (index_ + 1 >= argc_) throw UsageError(flag + ": missing value");
    return argv_[++index_];
  }
  std::string flag;

 private:
  int argc_;
  char** argv_;
  int index_ = 0;
};

// Runs a tool's body: every failure a user can cause ends in one "TOOL: error: ..." line (a
// usage error also prints the usage) and exit code 2.
template <typename Body>
int run_tool(const char* tool, const char* usage, Body body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: error: %s\n%s", tool, e.what(), usage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", tool, e.what());
    return 2;
  }
}

}  // namespace prge
