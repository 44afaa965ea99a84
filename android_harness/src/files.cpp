#include "files.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

namespace prge {

static std::string errno_text() { return std::strerror(errno); }

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_dirs(const std::string& path) {
  if (path.empty() || is_dir(path)) return;
  auto slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) make_dirs(path.substr(0, slash));
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) throw FileError(path + ": cannot create directory (" + errno_text() + ")");
}

std::vector<unsigned char> read_bytes(const std::string& path) {
  if (!is_file(path)) throw FileError(path + ": not found");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw FileError(path + ": cannot open (" + errno_text() + ")");
  std::vector<unsigned char> out;
  unsigned char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  bool failed = std::ferror(f);
  std::fclose(f);
  if (failed) throw FileError(path + ": read error");
  return out;
}

std::string read_text(const std::string& path) {
  auto bytes = read_bytes(path);
  return std::string(bytes.begin(), bytes.end());
}

void write_file_synced(const std::string& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw FileError(path + ": cannot write (" + errno_text() + ")");
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      throw FileError(path + ": write failed (" + errno_text() + ")");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    throw FileError(path + ": fsync failed (" + errno_text() + ")");
  }
  ::close(fd);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  auto slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  std::string tmp = join(dir, "." + name + ".tmp");
  write_file_synced(tmp, bytes);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw FileError(path + ": rename failed (" + errno_text() + ")");
  fsync_dir(dir);
}

void fsync_dir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw FileError(path + ": cannot open directory (" + errno_text() + ")");
  ::fsync(fd);
  ::close(fd);
}

static int remove_entry(const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }

void remove_tree(const std::string& path) {
  ::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string parent_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

static std::string base_name(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Entries of dir whose names start with prefix, sorted.
static std::vector<std::string> list_prefixed(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* ent = ::readdir(d)) {
      std::string name = ent->d_name;
      if (name.rfind(prefix, 0) == 0) out.push_back(join(dir, name));
    }
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> moved_aside(const std::string& target) {
  return list_prefixed(parent_of(target), "." + base_name(target) + "-old.");
}

void replace_dir_atomically(const std::string& target, const std::function<void(const std::string&)>& write,
                            const std::function<void()>& on_written, const std::function<void()>& on_old_moved) {
  const std::string parent = parent_of(target), name = base_name(target);
  make_dirs(parent);
  std::string templ = join(parent, "." + name + "-new.XXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw FileError(parent + ": cannot create a temporary folder (" + errno_text() + ")");
  const std::string tmp(buf.data());
  try {
    write(tmp);  // its files are written with write_file_synced
    ::chmod(tmp.c_str(), 0755);  // mkdtemp makes it owner-only
    fsync_dir(tmp);
    if (on_written) on_written();
    if (is_dir(target)) {
      std::string old = join(parent, "." + name + "-old." + std::to_string(::getpid()));
      if (std::rename(target.c_str(), old.c_str()) != 0) throw FileError(target + ": cannot move the old copy aside");
      if (on_old_moved) on_old_moved();
    }
    if (std::rename(tmp.c_str(), target.c_str()) != 0) throw FileError(target + ": cannot move the new copy in");
    fsync_dir(parent);
  } catch (...) {
    remove_tree(tmp);
    throw;
  }
  for (const auto& stale : list_prefixed(parent, "." + name + "-new.")) remove_tree(stale);
  for (const auto& stale : moved_aside(target)) remove_tree(stale);
}

}  // namespace prge
