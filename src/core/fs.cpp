#include "core/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

namespace sn {

namespace {

// The text every disk-full error carries, after its path (says_disk_full).
constexpr std::string_view kDiskFull = ": disk full (";

struct SimulatedFullDisk {
  std::mutex mutex;
  std::string dir;     // with a trailing separator; empty: off
  int files_left = 0;  // files under DIR still written whole
};
SimulatedFullDisk& simulated_full_disk() {
  static SimulatedFullDisk disk;
  return disk;
}

// Whether a file about to be written at PATH finds the disk full: only the
// tests' simulated disk (simulate_disk_full_for_tests) says so here; a real
// one says so through errno.
bool simulated_full(const std::filesystem::path& path) {
  auto& disk = simulated_full_disk();
  std::lock_guard<std::mutex> lock(disk.mutex);
  if (disk.dir.empty() || !std::filesystem::absolute(path).lexically_normal().string().starts_with(disk.dir))
    return false;
  if (disk.files_left > 0) {
    --disk.files_left;
    return false;
  }
  return true;
}

// ERR from a call that wrote PATH (WHAT: "write failed", …). A full disk or
// quota is resource_exhausted, so whoever owns the disk can tell it from a
// bug; anything else is internal.
Error write_error(const std::filesystem::path& path, std::string_view what, int err) {
  if (err == ENOSPC || err == EDQUOT)
    return kind_error(ErrorKind::resource_exhausted, "{}{}{})", path.string(), kDiskFull, std::strerror(err));
  return make_error("{}: {}: {}", path.string(), what, std::strerror(err));
}

}  // namespace

bool says_disk_full(std::string_view message) { return message.find(kDiskFull) != std::string_view::npos; }

void simulate_disk_full_for_tests(const std::filesystem::path& dir, int files_left) {
  auto& disk = simulated_full_disk();
  std::lock_guard<std::mutex> lock(disk.mutex);
  disk.dir = dir.empty() ? "" : (std::filesystem::absolute(dir).lexically_normal() / "").string();
  disk.files_left = files_left;
}

Result<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return input_error("{}: cannot read: {}", path.string(), std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

namespace {

// Writes all of DATA to FD (retrying short writes and EINTR); PATH names it in errors.
Status write_all(int fd, std::string_view data, const std::filesystem::path& path) {
  size_t done = 0;
  // A simulated full disk takes half of the data, as a real one would take what fits.
  const bool full = simulated_full(path);
  while (done < data.size()) {
    if (full && done >= data.size() / 2) return write_error(path, "write failed", ENOSPC);
    ssize_t n = ::write(fd, data.data() + done, full ? std::max<size_t>(1, data.size() / 2 - done) : data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return write_error(path, "write failed", errno);
    }
    done += static_cast<size_t>(n);
  }
  return ok_status();
}

// A rename is durable only once its directory is synced.
Status sync_parent_directory(const std::filesystem::path& path) {
  return sync_directory(path.has_parent_path() ? path.parent_path() : std::filesystem::path("."));
}

}  // namespace

Status write_file_atomic(const std::filesystem::path& path, std::string_view data, int mode) {
  auto tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return write_error(path, "cannot write", errno);
  if (auto written = write_all(fd, data, path); !written.ok()) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return written;
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return write_error(path, "fsync failed", err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return write_error(path, "rename failed", err);
  }
  return sync_parent_directory(path);
}

Status append_file(const std::filesystem::path& path, std::string_view data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return write_error(path, "cannot write", errno);
  auto written = write_all(fd, data, path);
  ::close(fd);
  return written;
}

Status rename_durable(const std::filesystem::path& from, const std::filesystem::path& to) {
  int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error("{}: cannot open: {}", from.string(), std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return write_error(from, "fsync failed", err);
  if (::rename(from.c_str(), to.c_str()) != 0) return write_error(to, "rename failed", errno);
  return sync_parent_directory(to);
}

Status sync_directory(const std::filesystem::path& dir) {
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return make_error("{}: cannot open directory to sync: {}", dir.string(), std::strerror(errno));
  int rc = ::fsync(dir_fd);
  int err = errno;
  ::close(dir_fd);
  if (rc != 0) return write_error(dir, "directory fsync failed", err);
  return ok_status();
}

Status ensure_directory(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec == std::errc::no_space_on_device || ec.value() == EDQUOT) return write_error(dir, "", ec.value());
  if (ec) return input_error("{}: cannot create directory: {}", dir.string(), ec.message());
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return input_error("{}: directory is not writable: {}", dir.string(), std::strerror(errno));
  return ok_status();
}

}  // namespace sn

namespace sn {

Status check_output_file(const std::filesystem::path& path, std::string_view flag) {
  namespace fs = std::filesystem;
  if (path.empty()) return input_error("{}: empty path", flag);
  std::error_code ec;
  if (fs::is_directory(path, ec))
    return input_error("{} {}: is a directory; give a file name in it", flag, path.string());
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  if (!fs::exists(dir, ec))
    return input_error("{} {}: directory {} does not exist", flag, path.string(), dir.string());
  if (!fs::is_directory(dir, ec))
    return input_error("{} {}: {} is not a directory", flag, path.string(), dir.string());
  // write_file_atomic creates a temp file beside PATH and renames it over PATH.
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return input_error("{} {}: directory {} is not writable", flag, path.string(), dir.string());
  return ok_status();
}

Status check_input_file(const std::filesystem::path& path, std::string_view flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.empty()) return input_error("{}: empty path", flag);
  if (!fs::exists(path, ec)) return input_error("{} {}: no such file", flag, path.string());
  if (fs::is_directory(path, ec)) return input_error("{} {}: is a directory, not a file", flag, path.string());
  // A device or a pipe (/dev/zero, /dev/stdin) has no end to read up to.
  if (!fs::is_regular_file(path, ec)) return input_error("{} {}: not a regular file", flag, path.string());
  if (::access(path.c_str(), R_OK) != 0) return input_error("{} {}: not readable", flag, path.string());
  return ok_status();
}

}  // namespace sn
