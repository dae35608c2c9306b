// Codecs for the bytes between pipeline stages (activations and their gradients)
// and between data-parallel replicas (gradients). docs/compression.md gives the
// byte layout of every codec; the formulas below give their sizes exactly.
//
// Determinism: every codec is a pure function of its inputs, its seed and (for
// AQ-SGD) its buffer; results are bitwise reproducible across runs, machines of
// the same architecture and thread counts (no torch kernels touch the numbers).
// Validation: every decode checks the whole message (codec name, shape, data
// length, bit width, indices, checksums) and returns an error instead of
// crashing or returning garbage.
// Thread-safety: codec objects are not thread-safe; free functions are.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace sn::compress {

using solvernet::v1::CompressedTensor;

// ---------------------------------------------------------------------------
// Bit packing: value i occupies bits [i·bits, (i+1)·bits) of the byte stream,
// least significant bit first; padding bits of the last byte are zero.

inline constexpr int kMinBits = 1;
inline constexpr int kMaxBits = 8;

int64_t packed_size_bytes(int64_t count, int bits);  // ceil(count·bits / 8)
// Requires bits in [1, 8]; every value must be < 2^bits (higher bits are dropped).
std::vector<uint8_t> pack_bits(std::span<const uint8_t> values, int bits);
// Rejects a byte count other than packed_size_bytes(count, bits) and nonzero padding.
Result<std::vector<uint8_t>> unpack_bits(std::span<const uint8_t> packed, int bits, int64_t count);

// ---------------------------------------------------------------------------
// Stochastic uniform quantization with a per-row max-abs scale (a row is the
// last dimension). A row with scale s maps to the 2^bits evenly spaced levels
// -s + k·2s/(2^bits − 1), k = 0 … 2^bits − 1, rounding up or down at random
// with the probabilities that make E[Q(x)] = x (unbiased). s is max|x| rounded
// UP to bfloat16, so every value lies inside [-s, s] and no clamping biases it.
// The random stream is counter-based: element i of a call with seed S always
// draws the same number, whatever the thread count.
//
// Block layout (docs/compression.md): rows × bf16 scale (LE), then the packed codes.

int64_t quantized_size_bytes(int64_t numel, int64_t row_length, int bits);

// Appends the block for VALUES to OUT; rows are ROW_LENGTH values each, the
// last one possibly shorter (rows = ceil(numel / row_length)).
// Rejects bits outside [1, 8], and non-finite values or rows beyond the
// bfloat16 range (kind diverged: training blew up, docs/resilience.md).
Status quantize_rows(std::span<const float> values, int64_t row_length, int bits, uint64_t seed,
                     std::string& out);
// Reads one block from the front of IN into OUT (numel = out.size()); returns the
// bytes consumed. Rejects a short block, bad padding and non-finite scales.
Result<int64_t> dequantize_rows(std::span<const uint8_t> in, int64_t row_length, int bits,
                                std::span<float> out);

// Tensor forms: rows = the last dimension; X is converted to contiguous fp32.
Result<std::string> quantize(const torch::Tensor& x, int bits, uint64_t seed);
Result<torch::Tensor> dequantize(std::string_view block, const std::vector<int64_t>& shape,
                                 int bits);

// ---------------------------------------------------------------------------
// Activation codecs (pipeline boundaries).
//
// Codec names on the wire: "fp32", "fp16", "quant", "aqsgd". A micro-batch is
// a tensor [B, sample_shape...] whose B rows are the samples SAMPLE_IDS.

struct ActivationBufferOptions {
  std::filesystem::path path;          // AQ-SGD buffer file (node's data dir); unused otherwise
  int64_t num_samples = 0;             // sample ids are in [0, num_samples)
  std::vector<int64_t> sample_shape;   // e.g. [seq_len, d_model]; empty: any shape accepted
};

class ActivationCodec {
 public:
  virtual ~ActivationCodec();
  virtual std::string_view name() const = 0;  // the codec field of its messages

  // Sender side. X is [sample_ids.size(), sample_shape...]; RNG_SEED drives the
  // stochastic rounding (the receiver needs no seed). AQ-SGD updates its buffer.
  // A value the codec cannot carry (not finite, beyond fp16 or bfloat16) is an
  // error of kind diverged: the training blew up, not the link.
  virtual Result<CompressedTensor> encode(const torch::Tensor& x,
                                          const std::vector<int64_t>& sample_ids,
                                          uint64_t rng_seed) = 0;
  // Receiver side: an fp32 tensor of the message's shape. AQ-SGD updates its own
  // buffer the same way the sender did and fails if the two have drifted apart.
  virtual Result<torch::Tensor> decode(const CompressedTensor& message,
                                       const std::vector<int64_t>& sample_ids) = 0;

  // AQ-SGD: BLAKE2b-256 over the buffer file's header and slot table (each
  // slot's checksum binds its sample id and fp16 values), i.e. over the first
  // 64 + 16 · num_samples bytes of the file: a digest of every buffer without
  // reading the buffers. Sender and receiver of a boundary hold the same one.
  // nullopt for codecs without a buffer.
  virtual std::optional<std::array<uint8_t, 32>> buffer_digest() const { return std::nullopt; }
  // Makes buffer updates durable (msync); call at checkpoints. No-op without a buffer.
  virtual Status flush() { return ok_status(); }
  // Drops the buffers of SAMPLE_IDS so their next pass goes in full: how a
  // pipeline recovers after decode reported drift (both sides must forget).
  virtual Status forget(const std::vector<int64_t>& sample_ids) {
    (void)sample_ids;
    return ok_status();
  }
};

// config.activations: "none" (fp32 on the wire), "fp16", "quant" (direct
// quantization at forward_bits / backward_bits), "aqsgd" (forward: AQ-SGD at
// forward_bits with a buffer file at buffer.path, created or reopened; backward:
// direct quantization at backward_bits). A buffer file is locked: one codec
// object per file at a time.
Result<std::unique_ptr<ActivationCodec>> make_activation_codec(
    const CompressionConfig& config, bool forward_direction, const ActivationBufferOptions& buffer);

// Exact size of the data field of each codec's message.
int64_t fp32_data_bytes(int64_t numel);
int64_t fp16_data_bytes(int64_t numel);
int64_t quant_data_bytes(int64_t numel, int64_t row_length, int bits);
// B samples of SAMPLE_NUMEL values in rows of ROW_LENGTH, FULL_SAMPLES of them in fp16.
int64_t aqsgd_data_bytes(int64_t batch, int64_t sample_numel, int64_t row_length, int bits,
                         int64_t full_samples);
// Data bytes per micro-batch of SHAPE for a direction in steady state (every
// sample seen before): what the scheduler's cost model should charge.
int64_t steady_state_activation_bytes(const CompressionConfig& config, bool forward_direction,
                                      const std::vector<int64_t>& shape);

// ---------------------------------------------------------------------------
// Gradient compression for data parallelism, with error feedback.
//
// compress(g) sends C(g + r) and keeps the new residual r ← (g + r) − D(C(g + r)),
// so Σ sent + new residual = Σ g + old residual, and nothing is ever lost, only
// delayed. Codec names: "fp32" (config "none"; residual stays zero), "fp16",
// "cocktail" (CocktailSGD: a random subset of random_fraction of the coordinates
// chosen by the shared seed, so every replica picks the same ones and no indices
// are sent; the topk_fraction largest of it by magnitude, marked in a bitmap;
// their values quantized to gradient_bits in buckets of kGradientBucket).
//
// With a ring: every replica compresses its own gradient once, the ring
// all-gathers the messages, and every replica decompresses and sums them in
// replica order, so all replicas hold bitwise the same sum.

inline constexpr int64_t kGradientBucket = 128;

class GradientCompressor {
 public:
  virtual ~GradientCompressor();
  virtual std::string_view name() const = 0;
  int64_t numel() const { return numel_; }

  // FLAT_GRADIENT: numel() values (any float dtype). SHARED_SEED must be the same
  // on every replica for a step (it picks the random subset); the stochastic
  // rounding uses it with this replica's salt. A value that is not finite (or
  // beyond the codec's range) is an error of kind diverged.
  virtual Result<CompressedTensor> compress(const torch::Tensor& flat_gradient,
                                            uint64_t shared_seed) = 0;
  // Any replica's message → dense fp32 [numel()]. Does not touch the residual.
  virtual Result<torch::Tensor> decompress(const CompressedTensor& message) const = 0;

  // The error-feedback residual, fp32 [numel()] (a copy); set it when resuming.
  torch::Tensor residual() const;
  Status set_residual(const torch::Tensor& residual);

 protected:
  GradientCompressor(int64_t numel, uint64_t replica_salt);
  int64_t numel_;
  uint64_t replica_salt_;
  std::vector<float> residual_;
};

// config.gradients: "none", "fp16" or "cocktail". NUMEL: length of the flat
// gradient. REPLICA_SALT: distinct per replica (e.g. its index), so rounding
// noise is independent across replicas.
Result<std::unique_ptr<GradientCompressor>> make_gradient_compressor(
    const CompressionConfig& config, int64_t numel, uint64_t replica_salt);

// Exact data size of a cocktail message with SUBSET_SIZE coordinates in the
// random subset, SELECTED of them sent, at BITS.
int64_t cocktail_data_bytes(int64_t subset_size, int64_t selected, int bits);
// Expected data bytes of one replica's message for NUMEL coordinates.
int64_t expected_gradient_bytes(const CompressionConfig& config, int64_t numel);

// Helpers shared by the codecs and useful to tests.
// The deterministic uniform draw in [0, 1) for element INDEX of stream SEED.
float uniform_draw(uint64_t seed, uint64_t index);
// Mixes a seed with a tag (e.g. a sample position) into an independent seed.
uint64_t derive_seed(uint64_t seed, uint64_t tag);

}  // namespace sn::compress
