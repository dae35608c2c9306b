#include "train/allreduce.h"

namespace sn::train {
namespace {

Result<torch::Tensor> decompress_from(const compress::GradientCompressor& compressor,
                                      const solvernet::v1::TensorMessage& m, const std::string& who) {
  if (!m.has_compressed())
    return kind_error(ErrorKind::bad_peer, "{} message from {} carries no compressed gradient", m.kind(), who);
  auto dense = compressor.decompress(m.compressed());
  if (!dense.ok()) return kind_error(ErrorKind::bad_peer, "{} message from {}: {}", m.kind(), who, dense.message());
  return dense;
}

solvernet::v1::TensorMessage compressed_message(compress::CompressedTensor payload) {
  solvernet::v1::TensorMessage m;
  *m.mutable_compressed() = std::move(payload);
  return m;
}

// Runs BODY; on error aborts TRANSPORT with it (the header's failure contract).
Status aborting_on_error(net::Transport& transport, const std::function<Status()>& body) {
  Status status = body();
  if (!status.ok()) transport.abort(status.message());
  return status;
}

}  // namespace

Status ring_allreduce(net::Transport& transport, const std::vector<int>& ring, torch::Tensor buffer, int64_t step,
                      const RingOptions& options) {
  if (!buffer.is_contiguous() || buffer.scalar_type() != torch::kFloat32)
    return make_error("all-reduce needs a contiguous f32 buffer");
  return net::RingAllreduce(transport, ring, options)
      .run({buffer.data_ptr<float>(), static_cast<size_t>(buffer.numel())}, step);
}

CompressedAllreduce::CompressedAllreduce(net::Transport& transport, std::vector<int> ring,
                                         compress::GradientCompressor& compressor, RingOptions options)
    : transport_(transport), ring_(std::move(ring)), compressor_(compressor), options_(std::move(options)) {}

Status CompressedAllreduce::run(torch::Tensor buffer, int64_t step, uint64_t shared_seed) {
  if (ring_.size() <= 1) return ok_status();
  if (!buffer.is_contiguous() || buffer.scalar_type() != torch::kFloat32 || buffer.numel() != compressor_.numel())
    return make_error("compressed all-reduce needs a contiguous f32 buffer of {} values", compressor_.numel());
  return aborting_on_error(transport_, [&]() -> Status {
    SN_ASSIGN(auto own, compressor_.compress(buffer, shared_seed));
    SN_ASSIGN(auto gathered, net::RingAllgather(transport_, ring_, options_).run(compressed_message(std::move(own)), step));
    torch::NoGradGuard no_grad;
    torch::Tensor sum;
    for (size_t source = 0; source < gathered.size(); ++source) {
      SN_ASSIGN(auto dense, decompress_from(compressor_, gathered[source], transport_.describe(ring_[source])));
      if (source == 0)
        sum = std::move(dense);
      else
        sum.add_(dense);
    }
    buffer.copy_(sum);
    return ok_status();
  });
}

TiedEmbeddingSync::TiedEmbeddingSync(net::Transport& transport, int peer, compress::GradientCompressor* compressor,
                                     std::chrono::milliseconds timeout)
    : transport_(transport), peer_(peer), compressor_(compressor) {
  options_.kind = "tied";
  options_.timeout = timeout;
}

Status TiedEmbeddingSync::run(torch::Tensor grad, int64_t step, uint64_t shared_seed) {
  if (grad.scalar_type() != torch::kFloat32) return make_error("tied embedding sync needs an f32 gradient");
  return aborting_on_error(transport_, [&]() -> Status {
    torch::NoGradGuard no_grad;
    net::PairExchange exchange(transport_, peer_, options_);
    if (!compressor_) {
      torch::Tensor own = grad.contiguous();
      SN_ASSIGN(auto incoming, exchange.run(net::f32_message({own.data_ptr<float>(), static_cast<size_t>(own.numel())}), step));
      torch::Tensor other = torch::empty({own.numel()}, own.options());
      SN_TRY(net::read_f32(incoming, {other.data_ptr<float>(), static_cast<size_t>(other.numel())},
                           transport_.describe(peer_)));
      grad.add_(other.view(grad.sizes()));
      return ok_status();
    }
    SN_ASSIGN(auto own, compressor_->compress(grad.reshape({-1}).contiguous(), shared_seed));
    auto outgoing = compressed_message(std::move(own));
    SN_ASSIGN(auto sum, decompress_from(*compressor_, outgoing, "this node"));
    SN_ASSIGN(auto incoming, exchange.run(std::move(outgoing), step));
    SN_ASSIGN(auto other, decompress_from(*compressor_, incoming, transport_.describe(peer_)));
    grad.copy_(sum.add_(other).view(grad.sizes()));
    return ok_status();
  });
}

}  // namespace sn::train
