// The pre-tokenized data file written by `prge export-data` (format: runtime_driver/data_file.py
// and android_harness/README.md). Rows are int64 here because the program takes int64 ids.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace prge {

struct Rows {
  int count = 0;
  int seq_len = 0;
  int label_width = 1;          // labels per row: 1 (class index) or seq_len (completion targets)
  std::vector<int64_t> ids;     // [count, seq_len]
  std::vector<int64_t> mask;    // [count, seq_len]
  std::vector<int64_t> labels;  // [count, label_width]
};

// A completion target not scored (prompt or padding position): prge/step.py IGNORE_TARGET.
constexpr int64_t kIgnoreTarget = -100;

struct DataFile {
  int seq_len = 0, num_labels = 0, label_width = 1, batch_size = 0, steps = 0;
  uint32_t run_seed = 0;
  std::string pte_sha256;
  Rows train, validation;
  std::vector<int32_t> order;  // train row of every training position, [steps * batch_size]
};

// Reads and validates the file against the program it will feed (sha256 of the .pte, seq_len,
// batch size, labels: class indices for a label-word program, per-position targets for a
// completion program). Throws std::runtime_error naming the file and the problem.
DataFile read_data_file(const std::string& path, const Manifest& manifest);

}  // namespace prge
