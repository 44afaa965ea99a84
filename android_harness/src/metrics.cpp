#include "metrics.hpp"

#include <unistd.h>

#include "files.hpp"
#include "json.hpp"

namespace prge {

MetricsLog::MetricsLog(const std::string& path, int resume_step) {
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
        // Train rows count steps from 0, eval rows steps done: keep what the checkpoint covers.
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

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const std::string& row) {
  std::fputs(row.c_str(), file_);
  std::fputc('\n', file_);
  std::fflush(file_);
  ::fsync(fileno(file_));
}

std::string number_list(const std::vector<double>& xs) {
  std::string out = "[";
  for (size_t i = 0; i < xs.size(); ++i) out += (i ? ", " : "") + format_double(xs[i]);  // null if non-finite
  return out + "]";
}

}  // namespace prge
