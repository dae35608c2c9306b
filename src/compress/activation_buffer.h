// AQ-SGD's per-sample activation buffers m(ξ): fp16 in a memory-mapped file,
// one slot per training sample, each with a checksum so that a slot changed
// behind our back (disk corruption, a crash between data and checksum, a
// sender and receiver that drifted apart) is detected, never used.
// File layout: docs/compression.md, "AQ-SGD buffer file". Private to sn_compress.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "compress/compress.h"

namespace sn::compress::detail {

class ActivationBuffer {
 public:
  // Creates the file (all slots empty) or reopens it, and reserves its blocks:
  // a disk without room for it is an error here (resource_exhausted, "PATH:
  // disk full (…)"), not a SIGBUS at a later store. A file made for
  // another sample count or shape is an error. Holds an exclusive flock on it.
  static Result<std::unique_ptr<ActivationBuffer>> open(const ActivationBufferOptions& options);
  ~ActivationBuffer();
  ActivationBuffer(const ActivationBuffer&) = delete;
  ActivationBuffer& operator=(const ActivationBuffer&) = delete;

  int64_t num_samples() const { return num_samples_; }
  int64_t sample_numel() const { return sample_numel_; }
  bool present(int64_t sample) const;
  // The slot's fp16 values (sample_numel of them); meaningful only if present.
  std::span<const uint16_t> values(int64_t sample) const;
  // Checks the slot's data against its stored checksum.
  Status verify(int64_t sample) const;
  // Writes VALUES into the slot, marks it present with CHECKSUM.
  void store(int64_t sample, std::span<const uint16_t> values, uint64_t checksum);
  void forget(int64_t sample);
  Status flush();
  // BLAKE2b-256 over the header and slot table (compress.h, buffer_digest).
  std::array<uint8_t, 32> table_digest() const;

 private:
  ActivationBuffer() = default;
  struct SlotEntry {
    uint64_t checksum;
    uint64_t present;
  };
  SlotEntry* entry(int64_t sample) const;
  uint16_t* slot(int64_t sample) const;

  std::filesystem::path path_;
  int fd_ = -1;
  uint8_t* map_ = nullptr;
  size_t map_bytes_ = 0;
  int64_t num_samples_ = 0;
  int64_t sample_numel_ = 0;
  size_t data_offset_ = 0;
};

// The checksum of a slot's contents: the first 8 bytes of BLAKE2b-256 over the
// sample id (u64 LE) and the fp16 values (LE). Binding the id catches a slot
// read for the wrong sample.
uint64_t slot_checksum(int64_t sample, std::span<const uint16_t> values);

}  // namespace sn::compress::detail
