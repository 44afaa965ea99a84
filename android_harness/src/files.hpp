// File helpers: whole-file reads, durable (fsync'd) writes, and the checkpoint directory swap.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace prge {

struct FileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool is_file(const std::string& path);
bool is_dir(const std::string& path);
void make_dirs(const std::string& path);
std::string read_text(const std::string& path);            // throws FileError "path: ..."
std::vector<unsigned char> read_bytes(const std::string& path);
void write_file_synced(const std::string& path, const std::string& bytes);  // write + fsync
void write_file_atomic(const std::string& path, const std::string& bytes);  // temp + fsync + rename
void fsync_dir(const std::string& path);
void remove_tree(const std::string& path);
std::string join(const std::string& dir, const std::string& name);

}  // namespace prge
