#include "data_file.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "checksums.hpp"
#include "files.hpp"

namespace prge {
namespace {

constexpr char kMagic[8] = {'P', 'R', 'G', 'E', 'D', 'A', 'T', 'A'};
constexpr uint32_t kVersion = 2;
constexpr size_t kHeaderBytes = 128;

uint32_t u32_at(const unsigned char* p) {  // little-endian regardless of the host
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

struct Reader {
  const unsigned char* p;
  size_t left;  // int32 values remaining
  std::vector<int64_t> take(size_t n) {
    std::vector<int64_t> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(u32_at(p + 4 * i));
    p += 4 * n;
    left -= n;
    return out;
  }
};

Rows read_rows(Reader& r, int count, int seq_len, int label_width) {
  Rows rows;
  rows.count = count;
  rows.seq_len = seq_len;
  rows.label_width = label_width;
  rows.ids = r.take(size_t(count) * seq_len);
  rows.mask = r.take(size_t(count) * seq_len);
  rows.labels = r.take(size_t(count) * label_width);
  return rows;
}

}  // namespace

DataFile read_data_file(const std::string& path, const Manifest& m) {
  auto fail = [&](const std::string& msg) { return std::runtime_error(path + ": " + msg); };
  std::vector<unsigned char> blob = read_bytes(path);
  if (blob.size() < kHeaderBytes || std::memcmp(blob.data(), kMagic, 8) != 0)
    throw fail("not a prge data file (bad magic or shorter than its header); write it with `prge export-data`");
  const unsigned char* h = blob.data();
  if (u32_at(h + 8) != kVersion)
    throw fail("data file format " + std::to_string(u32_at(h + 8)) + ", this driver reads " + std::to_string(kVersion) +
               "; re-run `prge export-data`");
  DataFile d;
  uint32_t fields[7];  // offsets 12..36: seq_len, num_labels, batch, n_train, n_val, steps, run_seed
  for (int i = 0; i < 7; ++i) fields[i] = u32_at(h + 12 + 4 * i);
  for (int i = 0; i < 6; ++i)  // sizes; the run seed may be any u32
    if (fields[i] > (1u << 30)) throw fail("implausible header (a size above 2^30): corrupted");
  d.seq_len = int(fields[0]);
  d.num_labels = int(fields[1]);
  d.batch_size = int(fields[2]);
  int n_train = int(fields[3]), n_val = int(fields[4]);
  d.steps = int(fields[5]);
  d.run_seed = fields[6];
  uint32_t checksum = u32_at(h + 40);
  uint32_t label_width = u32_at(h + 44);
  if (label_width != 1 && label_width != fields[0])
    throw fail("corrupted header (label_width " + std::to_string(label_width) + " is neither 1 nor seq_len)");
  d.label_width = int(label_width);
  d.pte_sha256.assign(reinterpret_cast<const char*>(h + 48), 64);
  if (d.pte_sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
    throw fail("corrupted header (the program's sha256 is not hex)");

  size_t expected = size_t(n_train) * (2 * d.seq_len + d.label_width) + size_t(n_val) * (2 * d.seq_len + d.label_width) +
                    size_t(d.steps) * d.batch_size;
  size_t payload = blob.size() - kHeaderBytes;
  if (payload != expected * 4)
    throw fail("truncated or has trailing bytes (payload " + std::to_string(payload) + " bytes, header implies " +
               std::to_string(expected * 4) + ")");
  if (crc32(blob.data() + kHeaderBytes, payload) != checksum) throw fail("checksum mismatch: the file is corrupted");

  // Bound to this program: a data file tokenized for another export would train on wrong rows.
  if (d.pte_sha256 != m.pte_sha256)
    throw fail("was written for another program (its .pte sha256 " + d.pte_sha256.substr(0, 12) +
               "... differs from " + m.pte_path + "'s " + m.pte_sha256.substr(0, 12) + "...); re-run `prge export-data`");
  if (d.seq_len != m.seq_len) throw fail("seq_len " + std::to_string(d.seq_len) + " differs from the program's " + std::to_string(m.seq_len));
  if (d.batch_size != m.batch_size) throw fail("batch size " + std::to_string(d.batch_size) + " differs from the program's " + std::to_string(m.batch_size));
  const int program_width = m.completion ? m.seq_len : 1;
  if (d.label_width != program_width)
    throw fail(std::string("holds ") + (d.label_width == 1 ? "a label-word task's labels" : "a completion task's targets") +
               ", the program is for " + (m.completion ? "a completion task" : "a label-word task") + "; re-run `prge export-data`");
  if (d.num_labels != m.num_labels) throw fail("has " + std::to_string(d.num_labels) + " labels, the program " + std::to_string(m.num_labels));
  if (n_train < 1 || n_val < 1 || d.steps < 1) throw fail("needs at least one train row, one validation row and one step");

  Reader r{blob.data() + kHeaderBytes, expected};
  d.train = read_rows(r, n_train, d.seq_len, d.label_width);
  d.validation = read_rows(r, n_val, d.seq_len, d.label_width);
  std::vector<int64_t> order = r.take(size_t(d.steps) * d.batch_size);
  for (const Rows* rows : {&d.train, &d.validation}) {
    if (m.completion) {
      for (int64_t target : rows->labels)
        if (target != kIgnoreTarget && (target < 0 || target >= m.vocab_size))
          throw fail("a target token outside the vocabulary (0.." + std::to_string(m.vocab_size - 1) + ")");
      // A row with nothing scored would divide by zero tokens in the held-out loss.
      for (int i = 0; i < rows->count; ++i) {
        auto first = rows->labels.begin() + size_t(i) * d.label_width;
        if (std::all_of(first, first + d.label_width, [](int64_t x) { return x == kIgnoreTarget; }))
          throw fail("a row with no scored target");
      }
    } else {
      for (int64_t label : rows->labels)
        if (label < 0 || label >= d.num_labels) throw fail("a label outside 0.." + std::to_string(d.num_labels - 1));
    }
    for (int64_t id : rows->ids)
      if (id < 0) throw fail("a negative token id");
  }
  d.order.reserve(order.size());
  for (int64_t row : order) {
    if (row < 0 || row >= n_train) throw fail("training order names row " + std::to_string(row) + " of " + std::to_string(n_train));
    d.order.push_back(static_cast<int32_t>(row));
  }
  return d;
}

}  // namespace prge
