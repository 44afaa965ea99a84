// run/metrics.jsonl, as runtime_driver/metrics.py writes it: one JSON object a line, flushed and
// fsync'd line by line; a torn last line from a killed run is dropped before appending.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace prge {

class MetricsLog {
 public:
  // Keeps what was logged before the checkpoint the run (re)starts from (resume_step steps
  // done; 0: a fresh run, an empty log), then appends.
  MetricsLog(const std::string& path, int resume_step);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const std::string& row);

 private:
  std::FILE* file_ = nullptr;
};

// A JSON list of numbers, null where not finite (as the Python driver logs losses).
std::string number_list(const std::vector<double>& xs);

}  // namespace prge
