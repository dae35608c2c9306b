#include "core/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace sn {

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
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return make_error("{}: write failed: {}", path.string(), std::strerror(errno));
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
  if (fd < 0) return make_error("{}: cannot write: {}", path.string(), std::strerror(errno));
  if (auto written = write_all(fd, data, path); !written.ok()) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return written;
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return make_error("{}: fsync failed: {}", path.string(), std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return make_error("{}: rename failed: {}", path.string(), std::strerror(err));
  }
  return sync_parent_directory(path);
}

Status append_file(const std::filesystem::path& path, std::string_view data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return make_error("{}: cannot write: {}", path.string(), std::strerror(errno));
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
  if (rc != 0) return make_error("{}: fsync failed: {}", from.string(), std::strerror(err));
  if (::rename(from.c_str(), to.c_str()) != 0)
    return make_error("{}: rename failed: {}", to.string(), std::strerror(errno));
  return sync_parent_directory(to);
}

Status sync_directory(const std::filesystem::path& dir) {
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return make_error("{}: cannot open directory to sync: {}", dir.string(), std::strerror(errno));
  int rc = ::fsync(dir_fd);
  int err = errno;
  ::close(dir_fd);
  if (rc != 0) return make_error("{}: directory fsync failed: {}", dir.string(), std::strerror(err));
  return ok_status();
}

Status ensure_directory(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
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
