#include "compress/activation_buffer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "compress/internal.h"
#include "core/fs.h"
#include "core/hash.h"

namespace sn::compress::detail {
namespace {

constexpr char kMagic[8] = {'S', 'N', 'A', 'Q', 'B', 'U', 'F', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 64;
constexpr size_t kMaxRank = 4;
constexpr size_t kPageBytes = 4096;

struct FileHeader {
  char magic[8];
  uint32_t version;
  uint32_t rank;
  uint64_t num_samples;
  uint64_t dims[kMaxRank];
  uint64_t data_offset;
};
static_assert(sizeof(FileHeader) == kHeaderBytes);

std::string shape_text(std::span<const uint64_t> dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

}  // namespace

uint64_t slot_checksum(int64_t sample, std::span<const uint16_t> values) {
  Hasher hasher;
  hasher.update_u64(static_cast<uint64_t>(sample));
  hasher.update({reinterpret_cast<const uint8_t*>(values.data()), values.size_bytes()});
  const Hash256 digest = hasher.finish();
  uint64_t checksum = 0;
  std::memcpy(&checksum, digest.data(), sizeof(checksum));
  return checksum;
}

Result<std::unique_ptr<ActivationBuffer>> ActivationBuffer::open(
    const ActivationBufferOptions& options) {
  const auto& path = options.path;
  if (path.empty()) return make_error("aqsgd: no buffer file path given");
  if (options.num_samples <= 0)
    return make_error("aqsgd: the dataset size must be > 0, got {}", options.num_samples);
  if (options.sample_shape.empty() || options.sample_shape.size() > kMaxRank)
    return make_error("aqsgd: the per-sample shape needs 1 to {} dimensions, got {}", kMaxRank,
                      options.sample_shape.size());
  for (int64_t d : options.sample_shape)
    if (d <= 0) return make_error("aqsgd: per-sample dimensions must be > 0, got {}", d);
  const auto sample_numel = checked_numel(options.sample_shape);
  const auto total_numel =
      sample_numel ? checked_numel(std::vector<int64_t>{options.num_samples, *sample_numel})
                   : std::nullopt;
  if (!total_numel) return make_error("aqsgd: buffer for {} samples is too large", options.num_samples);

  FileHeader wanted{};
  std::memcpy(wanted.magic, kMagic, sizeof(kMagic));
  wanted.version = kVersion;
  wanted.rank = static_cast<uint32_t>(options.sample_shape.size());
  wanted.num_samples = static_cast<uint64_t>(options.num_samples);
  for (size_t i = 0; i < options.sample_shape.size(); ++i)
    wanted.dims[i] = static_cast<uint64_t>(options.sample_shape[i]);
  const size_t table_end = kHeaderBytes + 16 * static_cast<size_t>(options.num_samples);
  wanted.data_offset = (table_end + kPageBytes - 1) / kPageBytes * kPageBytes;
  const size_t file_bytes = wanted.data_offset + 2 * static_cast<size_t>(*total_numel);

  if (path.has_parent_path()) SN_TRY(ensure_directory(path.parent_path()));
  std::unique_ptr<ActivationBuffer> buffer(new ActivationBuffer());
  buffer->path_ = path;
  buffer->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (buffer->fd_ < 0)
    return make_error("aqsgd: cannot open buffer file {}: {}", path.string(), std::strerror(errno));
  if (::flock(buffer->fd_, LOCK_EX | LOCK_NB) != 0)
    return make_error("aqsgd: buffer file {} is in use by another codec", path.string());
  struct stat info {};
  if (::fstat(buffer->fd_, &info) != 0)
    return make_error("aqsgd: cannot stat {}: {}", path.string(), std::strerror(errno));
  const bool fresh = info.st_size == 0;
  if (fresh) {
    // Empty slots read as "absent" (zeros), reserved below or not.
    if (::ftruncate(buffer->fd_, static_cast<off_t>(file_bytes)) != 0)
      return make_error("aqsgd: cannot size {} to {} bytes: {}", path.string(), file_bytes,
                        std::strerror(errno));
  } else if (static_cast<size_t>(info.st_size) < kHeaderBytes) {
    return make_error("aqsgd: {} is not a buffer file (only {} bytes)", path.string(), info.st_size);
  }
  buffer->map_bytes_ = fresh ? file_bytes : static_cast<size_t>(info.st_size);
  // The mapping is written through stores, which cannot return ENOSPC: a page
  // a full disk cannot back kills the process with SIGBUS. Reserving every
  // block now turns that into this error, before the job relies on the buffer.
  if (const int err = ::posix_fallocate(buffer->fd_, 0, static_cast<off_t>(buffer->map_bytes_)); err != 0) {
    if (fresh) ::unlink(path.c_str());  // a later open must not take the unreserved file as made
    if (err == ENOSPC || err == EDQUOT)
      return kind_error(ErrorKind::resource_exhausted, "{}: disk full ({}; the AQ-SGD buffer needs {} bytes)",
                        path.string(), std::strerror(err), buffer->map_bytes_);
    if (err != EOPNOTSUPP && err != EINVAL)  // a filesystem without fallocate: stores still work while it has room
      return make_error("aqsgd: cannot reserve {} bytes for {}: {}", buffer->map_bytes_, path.string(),
                        std::strerror(err));
  }
  void* map = ::mmap(nullptr, buffer->map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, buffer->fd_, 0);
  if (map == MAP_FAILED) {
    buffer->map_bytes_ = 0;
    return make_error("aqsgd: cannot map {}: {}", path.string(), std::strerror(errno));
  }
  buffer->map_ = static_cast<uint8_t*>(map);

  if (fresh) {
    std::memcpy(buffer->map_, &wanted, sizeof(wanted));
  } else {
    FileHeader found{};
    std::memcpy(&found, buffer->map_, sizeof(found));
    if (std::memcmp(found.magic, kMagic, sizeof(kMagic)) != 0 || found.version != kVersion)
      return make_error("aqsgd: {} is not a version {} buffer file", path.string(), kVersion);
    if (std::memcmp(&found, &wanted, sizeof(found)) != 0 || buffer->map_bytes_ != file_bytes) {
      const auto found_rank = std::min<size_t>(found.rank, kMaxRank);
      return make_error(
          "aqsgd: buffer file {} holds {} samples of shape {}, the job needs {} of shape {}; "
          "delete it to start over",
          path.string(), found.num_samples, shape_text({found.dims, found_rank}),
          wanted.num_samples, shape_text({wanted.dims, wanted.rank}));
    }
  }
  buffer->num_samples_ = options.num_samples;
  buffer->sample_numel_ = *sample_numel;
  buffer->data_offset_ = wanted.data_offset;
  return buffer;
}

ActivationBuffer::~ActivationBuffer() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);  // also releases the flock
}

ActivationBuffer::SlotEntry* ActivationBuffer::entry(int64_t sample) const {
  return reinterpret_cast<SlotEntry*>(map_ + kHeaderBytes + 16 * static_cast<size_t>(sample));
}

uint16_t* ActivationBuffer::slot(int64_t sample) const {
  return reinterpret_cast<uint16_t*>(map_ + data_offset_ +
                                     2 * static_cast<size_t>(sample * sample_numel_));
}

bool ActivationBuffer::present(int64_t sample) const { return entry(sample)->present == 1; }

std::span<const uint16_t> ActivationBuffer::values(int64_t sample) const {
  return {slot(sample), static_cast<size_t>(sample_numel_)};
}

Status ActivationBuffer::verify(int64_t sample) const {
  const SlotEntry* e = entry(sample);
  if (e->present != 1) {
    if (e->present != 0)
      return make_error("aqsgd: buffer file {} is corrupt at sample {} (state {})", path_.string(),
                        sample, e->present);
    return ok_status();
  }
  if (slot_checksum(sample, values(sample)) != e->checksum)
    return make_error("aqsgd: buffer for sample {} in {} does not match its checksum (corrupt, or "
                      "a crash between writing data and checksum)",
                      sample, path_.string());
  return ok_status();
}

void ActivationBuffer::store(int64_t sample, std::span<const uint16_t> new_values,
                             uint64_t checksum) {
  SlotEntry* e = entry(sample);
  // Clear first so a crash mid-copy leaves a slot that fails verification.
  e->present = 0;
  std::memcpy(slot(sample), new_values.data(), new_values.size_bytes());
  e->checksum = checksum;
  e->present = 1;
}

void ActivationBuffer::forget(int64_t sample) {
  SlotEntry* e = entry(sample);
  e->present = 0;
  e->checksum = 0;
}

std::array<uint8_t, 32> ActivationBuffer::table_digest() const {
  return hash_bytes({map_, kHeaderBytes + 16 * static_cast<size_t>(num_samples_)});
}

Status ActivationBuffer::flush() {
  if (::msync(map_, map_bytes_, MS_SYNC) != 0)
    return make_error("aqsgd: cannot flush {}: {}", path_.string(), std::strerror(errno));
  return ok_status();
}

}  // namespace sn::compress::detail
