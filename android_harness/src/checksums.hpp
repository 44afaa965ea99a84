// SHA-256 (to check that a .pte/.ptd is the one its manifest was written for) and CRC-32 (the
// data file's payload check). Hand-written: the ExecuTorch runtime ships neither.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace prge {

std::string sha256_file_hex(const std::string& path);  // throws std::runtime_error if unreadable
std::string sha256_hex(const std::string& bytes);
uint32_t crc32(const unsigned char* data, size_t size);  // zlib's CRC-32

}  // namespace prge
