// The one-tensor safetensors files the driver reads and writes: key "adapter", F32, shape [N]
// (the checkpoint and final-adapter format of the Python driver). Format: u64 little-endian
// header length, a JSON header, then the raw data.
#pragma once

#include <string>
#include <vector>

namespace prge {

std::string encode_adapter_safetensors(const std::vector<float>& adapter);
// Throws std::runtime_error naming the file when it is not a flat F32 "adapter" of numel values.
std::vector<float> read_adapter_safetensors(const std::string& path, long long numel);

}  // namespace prge
