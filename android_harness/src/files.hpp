// File helpers: whole-file reads and the two durable writers, the same as models/files.py: a
// file through a temp name (fsync, rename), and a folder swapped in by renames.
#pragma once

#include <functional>
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
std::string parent_of(const std::string& path);

// `write` fills a new temp folder beside target (.NAME-new.XXXXXX); its files are fsync'd and it
// replaces target by two renames: target -> .NAME-old.PID, temp -> target; never
// delete-then-rename, so a kill between them leaves the complete old copy (moved_aside).
// Afterwards the old copy and what a killed writer left are removed. on_written and
// on_old_moved run just before and after the first rename (the crash tests' kill points).
void replace_dir_atomically(const std::string& target, const std::function<void(const std::string&)>& write,
                            const std::function<void()>& on_written = {}, const std::function<void()>& on_old_moved = {});
// Complete old copies of target that a kill between the two renames left beside it, sorted.
std::vector<std::string> moved_aside(const std::string& target);

}  // namespace prge
