// Activation codecs: fp32, fp16, direct quantization and AQ-SGD (compress.h).
#include <torch/types.h>

#include <cmath>
#include <set>

#include "compress/activation_buffer.h"
#include "compress/compress.h"
#include "compress/internal.h"

namespace sn::compress {

using namespace detail;

ActivationCodec::~ActivationCodec() = default;

namespace {

constexpr float kHalfMax = 65504.0f;
constexpr uint8_t kFullSample = 0;
constexpr uint8_t kDeltaSample = 1;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

std::vector<int64_t> message_shape(const CompressedTensor& message) {
  return {message.shape().begin(), message.shape().end()};
}

std::span<const uint8_t> message_bytes(const CompressedTensor& message) {
  return as_span(message.data());
}

// What every codec checks first: the codec name, sample ids in range and
// distinct, and the shape [B, sample_shape...] (any shape if sample_shape is
// empty). Returns the element count.
class BatchChecker {
 public:
  BatchChecker(std::string codec, const ActivationBufferOptions& options)
      : codec_(std::move(codec)), options_(options) {}

  Status check_ids(const std::vector<int64_t>& sample_ids, bool require_range) const {
    std::set<int64_t> seen;
    for (int64_t id : sample_ids) {
      if (require_range && (id < 0 || id >= options_.num_samples))
        return make_error("{}: sample id {} is outside [0, {})", codec_, id, options_.num_samples);
      if (!seen.insert(id).second)
        return make_error("{}: sample id {} appears twice in one micro-batch", codec_, id);
    }
    return ok_status();
  }

  Result<int64_t> check_shape(const std::vector<int64_t>& shape, size_t batch,
                              std::string_view what) const {
    if (!options_.sample_shape.empty()) {
      std::vector<int64_t> expected{static_cast<int64_t>(batch)};
      expected.insert(expected.end(), options_.sample_shape.begin(), options_.sample_shape.end());
      if (shape != expected)
        return make_error("{}: {} has shape {}, expected {}", codec_, what, shape_text(shape),
                          shape_text(expected));
    }
    const auto numel = checked_numel(shape);
    if (!numel) return make_error("{}: {} has an invalid shape {}", codec_, what, shape_text(shape));
    return *numel;
  }

  Result<int64_t> check_message(const CompressedTensor& message, size_t batch) const {
    if (message.codec() != codec_)
      return make_error("{}: got a message encoded with codec '{}'", codec_, message.codec());
    return check_shape(message_shape(message), batch, "message");
  }

  const std::string& codec() const { return codec_; }

 private:
  std::string codec_;
  ActivationBufferOptions options_;
};

torch::Tensor as_fp32(const torch::Tensor& x) {
  return x.to(torch::kCPU, torch::kFloat32).contiguous();
}

std::span<const float> float_span(const torch::Tensor& x) {
  return {x.data_ptr<float>(), static_cast<size_t>(x.numel())};
}

CompressedTensor new_message(std::string_view codec, const torch::Tensor& x) {
  CompressedTensor message;
  message.set_codec(std::string(codec));
  for (int64_t d : x.sizes()) message.add_shape(d);
  return message;
}

class Fp32Codec final : public ActivationCodec {
 public:
  explicit Fp32Codec(const ActivationBufferOptions& options) : checker_("fp32", options) {}
  std::string_view name() const override { return "fp32"; }

  Result<CompressedTensor> encode(const torch::Tensor& x, const std::vector<int64_t>& sample_ids,
                                  uint64_t) override {
    SN_TRY(checker_.check_shape(x.sizes().vec(), sample_ids.size(), "input"));
    const torch::Tensor values = as_fp32(x);
    CompressedTensor message = new_message(name(), values);
    message.set_data(values.data_ptr(), static_cast<size_t>(fp32_data_bytes(values.numel())));
    return message;
  }

  Result<torch::Tensor> decode(const CompressedTensor& message,
                               const std::vector<int64_t>& sample_ids) override {
    SN_ASSIGN(const int64_t numel, checker_.check_message(message, sample_ids.size()));
    if (static_cast<int64_t>(message.data().size()) != fp32_data_bytes(numel))
      return make_error("fp32: {} values take {} bytes, got {}", numel, fp32_data_bytes(numel),
                        message.data().size());
    torch::Tensor out = torch::empty(message_shape(message), torch::kFloat32);
    std::memcpy(out.data_ptr(), message.data().data(), message.data().size());
    return out;
  }

 private:
  BatchChecker checker_;
};

class Fp16Codec final : public ActivationCodec {
 public:
  explicit Fp16Codec(const ActivationBufferOptions& options) : checker_("fp16", options) {}
  std::string_view name() const override { return "fp16"; }

  Result<CompressedTensor> encode(const torch::Tensor& x, const std::vector<int64_t>& sample_ids,
                                  uint64_t) override {
    SN_TRY(checker_.check_shape(x.sizes().vec(), sample_ids.size(), "input"));
    const torch::Tensor values = as_fp32(x);
    std::string data;
    data.reserve(static_cast<size_t>(fp16_data_bytes(values.numel())));
    for (float v : float_span(values)) {
      if (!(std::fabs(v) <= kHalfMax))
        return kind_error(ErrorKind::diverged, "fp16: activation {} is outside the fp16 range", v);
      append_le(data, float_to_half(v));
    }
    CompressedTensor message = new_message(name(), values);
    message.set_data(std::move(data));
    return message;
  }

  Result<torch::Tensor> decode(const CompressedTensor& message,
                               const std::vector<int64_t>& sample_ids) override {
    SN_ASSIGN(const int64_t numel, checker_.check_message(message, sample_ids.size()));
    if (static_cast<int64_t>(message.data().size()) != fp16_data_bytes(numel))
      return make_error("fp16: {} values take {} bytes, got {}", numel, fp16_data_bytes(numel),
                        message.data().size());
    torch::Tensor out = torch::empty(message_shape(message), torch::kFloat32);
    float* values = out.data_ptr<float>();
    ByteReader reader(message_bytes(message));
    for (int64_t i = 0; i < numel; ++i) {
      uint16_t bits = 0;
      reader.read(bits);
      values[i] = half_to_float(bits);
      if (!std::isfinite(values[i])) return make_error("fp16: non-finite value at element {}", i);
    }
    return out;
  }

 private:
  BatchChecker checker_;
};

class QuantCodec final : public ActivationCodec {
 public:
  QuantCodec(int bits, const ActivationBufferOptions& options)
      : bits_(bits), checker_("quant", options) {}
  std::string_view name() const override { return "quant"; }

  Result<CompressedTensor> encode(const torch::Tensor& x, const std::vector<int64_t>& sample_ids,
                                  uint64_t rng_seed) override {
    SN_TRY(checker_.check_shape(x.sizes().vec(), sample_ids.size(), "input"));
    const torch::Tensor values = as_fp32(x);
    std::string data;
    append_le(data, static_cast<uint8_t>(bits_));
    SN_TRY(quantize_rows(float_span(values), row_length(values.sizes().vec()), bits_, rng_seed,
                         data));
    CompressedTensor message = new_message(name(), values);
    message.set_data(std::move(data));
    return message;
  }

  Result<torch::Tensor> decode(const CompressedTensor& message,
                               const std::vector<int64_t>& sample_ids) override {
    SN_ASSIGN(const int64_t numel, checker_.check_message(message, sample_ids.size()));
    const std::vector<int64_t> shape = message_shape(message);
    ByteReader reader(message_bytes(message));
    uint8_t bits = 0;
    if (!reader.read(bits)) return make_error("quant: empty message");
    if (bits != bits_)
      return make_error("quant: message quantized at {} bits, this link uses {}", bits, bits_);
    const int64_t expected = quant_data_bytes(numel, row_length(shape), bits_);
    if (static_cast<int64_t>(message.data().size()) != expected)
      return make_error("quant: {} values at {} bits take {} bytes, got {}", numel, bits_,
                        expected, message.data().size());
    torch::Tensor out = torch::empty(shape, torch::kFloat32);
    SN_TRY(dequantize_rows(reader.rest(), row_length(shape), bits_,
                           {out.data_ptr<float>(), static_cast<size_t>(numel)}));
    return out;
  }

 private:
  static int64_t row_length(const std::vector<int64_t>& shape) {
    return shape.empty() ? 1 : shape.back();
  }
  int bits_;
  BatchChecker checker_;
};

// AQ-SGD (Wang et al. 2022): the sender sends a sample's activation in full the
// first time, then Q(a − m) against the buffer m of what the receiver already
// holds; both sides set m ← fp16(m + Q(a − m)), so m tracks a and the message
// shrinks to the bits of the change. Message layout: docs/compression.md.
class AqsgdCodec final : public ActivationCodec {
 public:
  AqsgdCodec(int bits, const ActivationBufferOptions& options,
             std::unique_ptr<ActivationBuffer> buffer)
      : bits_(bits),
        checker_("aqsgd", options),
        row_length_(options.sample_shape.back()),
        buffer_(std::move(buffer)) {}
  std::string_view name() const override { return "aqsgd"; }

  Result<CompressedTensor> encode(const torch::Tensor& x, const std::vector<int64_t>& sample_ids,
                                  uint64_t rng_seed) override {
    SN_TRY(checker_.check_ids(sample_ids, true));
    SN_TRY(checker_.check_shape(x.sizes().vec(), sample_ids.size(), "input"));
    const torch::Tensor values = as_fp32(x);
    const std::span<const float> all = float_span(values);
    for (size_t i = 0; i < all.size(); ++i)
      if (!(std::fabs(all[i]) <= kHalfMax))
        return kind_error(ErrorKind::diverged, "aqsgd: activation {} at element {} is outside the fp16 range", all[i], i);
    for (int64_t id : sample_ids) SN_TRY(buffer_->verify(id));

    // Compute every new slot first and write them only when all succeeded, so
    // an error leaves the buffer as it was.
    const auto n = static_cast<size_t>(buffer_->sample_numel());
    std::string kinds, checksums, blocks;
    std::vector<std::vector<uint16_t>> updated(sample_ids.size(), std::vector<uint16_t>(n));
    std::vector<float> delta(n), sent(n);
    for (size_t b = 0; b < sample_ids.size(); ++b) {
      const int64_t id = sample_ids[b];
      const std::span<const float> activation = all.subspan(b * n, n);
      std::vector<uint16_t>& slot = updated[b];
      if (!buffer_->present(id)) {
        kinds.push_back(static_cast<char>(kFullSample));
        for (size_t i = 0; i < n; ++i) slot[i] = float_to_half(activation[i]);
        blocks.append(reinterpret_cast<const char*>(slot.data()), 2 * n);
      } else {
        kinds.push_back(static_cast<char>(kDeltaSample));
        const std::span<const uint16_t> previous = buffer_->values(id);
        for (size_t i = 0; i < n; ++i) delta[i] = activation[i] - half_to_float(previous[i]);
        const size_t block_start = blocks.size();
        SN_TRY(quantize_rows(delta, row_length_, bits_, derive_seed(rng_seed, b), blocks));
        // Decode our own block: the receiver will add exactly these values.
        SN_TRY(dequantize_rows(as_span(blocks).subspan(block_start), row_length_, bits_, sent));
        apply_delta(previous, sent, slot);
      }
      append_le(checksums, slot_checksum(id, slot));
    }
    for (size_t b = 0; b < sample_ids.size(); ++b) {
      uint64_t checksum = 0;
      std::memcpy(&checksum, checksums.data() + 8 * b, 8);
      buffer_->store(sample_ids[b], updated[b], checksum);
    }

    std::string data;
    append_le(data, static_cast<uint8_t>(bits_));
    data += kinds;
    data += checksums;
    data += blocks;
    CompressedTensor message = new_message(name(), values);
    message.set_data(std::move(data));
    return message;
  }

  Result<torch::Tensor> decode(const CompressedTensor& message,
                               const std::vector<int64_t>& sample_ids) override {
    SN_TRY(checker_.check_ids(sample_ids, true));
    SN_TRY(checker_.check_message(message, sample_ids.size()));
    const size_t batch = sample_ids.size();
    const auto n = static_cast<size_t>(buffer_->sample_numel());
    ByteReader reader(message_bytes(message));
    uint8_t bits = 0;
    if (!reader.read(bits)) return make_error("aqsgd: empty message");
    if (bits != bits_)
      return make_error("aqsgd: message quantized at {} bits, this link uses {}", bits, bits_);
    const auto kinds = reader.take(static_cast<int64_t>(batch));
    const auto checksums = reader.take(8 * static_cast<int64_t>(batch));
    if (!kinds || !checksums) return make_error("aqsgd: message truncated in its header");
    int64_t full_samples = 0;
    for (size_t b = 0; b < batch; ++b) {
      const uint8_t kind = (*kinds)[b];
      if (kind != kFullSample && kind != kDeltaSample)
        return make_error("aqsgd: unknown sample kind {} at position {}", kind, b);
      if (kind == kFullSample) ++full_samples;
    }
    const int64_t expected = aqsgd_data_bytes(static_cast<int64_t>(batch), static_cast<int64_t>(n),
                                              row_length_, bits_, full_samples);
    if (static_cast<int64_t>(message.data().size()) != expected)
      return make_error("aqsgd: {} samples ({} in full) take {} bytes, got {}", batch,
                        full_samples, expected, message.data().size());

    std::vector<std::vector<uint16_t>> updated(batch, std::vector<uint16_t>(n));
    std::vector<float> sent(n);
    for (size_t b = 0; b < batch; ++b) {
      const int64_t id = sample_ids[b];
      std::vector<uint16_t>& slot = updated[b];
      if ((*kinds)[b] == kFullSample) {
        const auto block = *reader.take(2 * static_cast<int64_t>(n));
        std::memcpy(slot.data(), block.data(), 2 * n);
      } else {
        if (!buffer_->present(id))
          return make_error("aqsgd: sender sent a delta for sample {} but this receiver holds no "
                            "buffer for it (the two sides drifted apart)",
                            id);
        SN_TRY(buffer_->verify(id));
        SN_ASSIGN(const int64_t used, dequantize_rows(reader.rest(), row_length_, bits_, sent));
        reader.take(used);
        apply_delta(buffer_->values(id), sent, slot);
      }
      uint64_t claimed = 0;
      std::memcpy(&claimed, checksums->data() + 8 * b, 8);
      if (slot_checksum(id, slot) != claimed)
        return make_error("aqsgd: buffer for sample {} differs between sender and receiver "
                          "after this message (drift or a corrupt message)",
                          id);
    }
    torch::Tensor out = torch::empty(message_shape(message), torch::kFloat32);
    float* values = out.data_ptr<float>();
    for (size_t b = 0; b < batch; ++b) {
      uint64_t claimed = 0;
      std::memcpy(&claimed, checksums->data() + 8 * b, 8);
      buffer_->store(sample_ids[b], updated[b], claimed);
      for (size_t i = 0; i < n; ++i) values[b * n + i] = half_to_float(updated[b][i]);
    }
    return out;
  }

  Status flush() override { return buffer_->flush(); }
  std::optional<std::array<uint8_t, 32>> buffer_digest() const override { return buffer_->table_digest(); }

  Status forget(const std::vector<int64_t>& sample_ids) override {
    for (int64_t id : sample_ids)
      if (id < 0 || id >= buffer_->num_samples())
        return make_error("aqsgd: sample id {} is outside [0, {})", id, buffer_->num_samples());
    for (int64_t id : sample_ids) buffer_->forget(id);
    return ok_status();
  }

 private:
  // m ← fp16(m + q), clamped to the fp16 range so an extreme delta cannot
  // overflow to infinity (both sides clamp identically).
  static void apply_delta(std::span<const uint16_t> previous, std::span<const float> sent,
                          std::vector<uint16_t>& out) {
    for (size_t i = 0; i < previous.size(); ++i) {
      const float next = half_to_float(previous[i]) + sent[i];
      out[i] = float_to_half(std::min(std::max(next, -kHalfMax), kHalfMax));
    }
  }

  int bits_;
  BatchChecker checker_;
  int64_t row_length_;
  std::unique_ptr<ActivationBuffer> buffer_;
};

Status check_bits(std::string_view field, int64_t bits) {
  if (bits < kMinBits || bits > kMaxBits)
    return input_error("compression.{} must be in [{}, {}], got {}", field, kMinBits, kMaxBits,
                       bits);
  return ok_status();
}

}  // namespace

Result<std::unique_ptr<ActivationCodec>> make_activation_codec(
    const CompressionConfig& config, bool forward_direction, const ActivationBufferOptions& buffer) {
  const std::string& kind = config.activations;
  const int64_t bits = forward_direction ? config.forward_bits : config.backward_bits;
  if (kind == "none") return std::unique_ptr<ActivationCodec>(new Fp32Codec(buffer));
  if (kind == "fp16") return std::unique_ptr<ActivationCodec>(new Fp16Codec(buffer));
  if (kind == "quant" || kind == "aqsgd") {
    SN_TRY(check_bits(forward_direction ? "forward_bits" : "backward_bits", bits));
    if (kind == "quant" || !forward_direction)
      return std::unique_ptr<ActivationCodec>(new QuantCodec(static_cast<int>(bits), buffer));
    SN_ASSIGN(auto file, ActivationBuffer::open(buffer));
    return std::unique_ptr<ActivationCodec>(
        new AqsgdCodec(static_cast<int>(bits), buffer, std::move(file)));
  }
  return input_error("compression.activations must be none, fp16, quant or aqsgd, got '{}'", kind);
}

int64_t fp32_data_bytes(int64_t numel) { return 4 * numel; }
int64_t fp16_data_bytes(int64_t numel) { return 2 * numel; }
int64_t quant_data_bytes(int64_t numel, int64_t row_length, int bits) {
  return 1 + quantized_size_bytes(numel, row_length, bits);
}
int64_t aqsgd_data_bytes(int64_t batch, int64_t sample_numel, int64_t row_length, int bits,
                         int64_t full_samples) {
  return 1 + 9 * batch + full_samples * 2 * sample_numel +
         (batch - full_samples) * quantized_size_bytes(sample_numel, row_length, bits);
}

int64_t steady_state_activation_bytes(const CompressionConfig& config, bool forward_direction,
                                      const std::vector<int64_t>& shape) {
  const int64_t numel = checked_numel(shape).value_or(0);
  const int64_t row_length = shape.empty() ? 1 : shape.back();
  const int bits = static_cast<int>(forward_direction ? config.forward_bits : config.backward_bits);
  if (config.activations == "fp16") return fp16_data_bytes(numel);
  if (config.activations == "quant" || (config.activations == "aqsgd" && !forward_direction))
    return quant_data_bytes(numel, row_length, bits);
  if (config.activations == "aqsgd") {
    const int64_t batch = shape.empty() ? 1 : shape.front();
    const int64_t sample_numel = batch > 0 ? numel / batch : 0;
    return aqsgd_data_bytes(batch, sample_numel, row_length, bits, 0);
  }
  return fp32_data_bytes(numel);
}

}  // namespace sn::compress
