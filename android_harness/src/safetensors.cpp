#include "safetensors.hpp"

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "files.hpp"
#include "json.hpp"

namespace prge {

static_assert(sizeof(float) == 4, "F32 is a 4-byte IEEE float");

std::string encode_adapter_safetensors(const std::vector<float>& adapter) {
  size_t bytes = adapter.size() * 4;
  std::string header = "{\"adapter\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(adapter.size()) +
                       "],\"data_offsets\":[0," + std::to_string(bytes) + "]}}";
  while (header.size() % 8) header += ' ';  // the data starts 8-byte aligned, as safetensors writes it
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out += header;
  size_t at = out.size();
  out.resize(at + bytes);
  for (size_t i = 0; i < adapter.size(); ++i) {  // little-endian regardless of the host
    uint32_t u;
    std::memcpy(&u, &adapter[i], 4);
    for (int k = 0; k < 4; ++k) out[at + 4 * i + k] = static_cast<char>((u >> (8 * k)) & 0xFF);
  }
  return out;
}

std::vector<float> read_adapter_safetensors(const std::string& path, long long numel) {
  auto fail = [&](const std::string& msg) { return std::runtime_error(path + ": " + msg); };
  std::vector<unsigned char> blob = read_bytes(path);
  if (blob.size() < 8) throw fail("truncated safetensors file");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(blob[i]) << (8 * i);
  if (header_len > blob.size() - 8) throw fail("truncated safetensors file (header longer than the file)");
  std::vector<float> out;
  try {
    Json header = Json::parse(std::string(blob.begin() + 8, blob.begin() + 8 + static_cast<long>(header_len)));
    const Json& t = header.at("adapter");
    if (t.at("dtype").string("adapter.dtype") != "F32") throw fail("adapter is not F32");
    const auto& shape = t.at("shape").array("adapter.shape");
    if (shape.size() != 1 || shape[0].integer("adapter.shape[0]") != numel)
      throw fail("adapter has shape " + t.at("shape").dump() + ", this program's is [" + std::to_string(numel) + "]");
    const auto& offsets = t.at("data_offsets").array("adapter.data_offsets");
    if (offsets.size() != 2) throw fail("bad data_offsets");
    long long begin = offsets[0].integer("data_offsets[0]"), end = offsets[1].integer("data_offsets[1]");
    size_t data_at = 8 + header_len;
    if (begin < 0 || end - begin != numel * 4 || data_at + size_t(end) > blob.size())
      throw fail("truncated safetensors file (adapter data out of range)");
    out.resize(size_t(numel));
    const unsigned char* p = blob.data() + data_at + begin;
    for (long long i = 0; i < numel; ++i) {
      uint32_t u = uint32_t(p[4 * i]) | uint32_t(p[4 * i + 1]) << 8 | uint32_t(p[4 * i + 2]) << 16 | uint32_t(p[4 * i + 3]) << 24;
      std::memcpy(&out[size_t(i)], &u, 4);
    }
  } catch (const JsonError& e) {
    throw fail(std::string("bad safetensors header: ") + e.what());
  }
  return out;
}

}  // namespace prge
