#include "train/pipeline_channel.h"

#include "model/tensor_wire.h"

namespace sn::train {
namespace {

const char* kind_of(Flow flow) { return flow == Flow::kActivation ? "act" : "grad"; }
const char* noun_of(Flow flow) { return flow == Flow::kActivation ? "activation" : "gradient"; }

}  // namespace

PipelineChannel::PipelineChannel(net::Transport& transport, int prev, int next, std::vector<int64_t> shape,
                                 Codecs codecs, std::chrono::milliseconds timeout)
    : transport_(transport), prev_(prev), next_(next), shape_(std::move(shape)), codecs_(codecs), timeout_(timeout) {}

Status PipelineChannel::send(Flow flow, int64_t step, int micro, const torch::Tensor& tensor,
                             const std::vector<int64_t>* sample_ids, uint64_t seed) {
  const bool forward = flow == Flow::kActivation;
  const int to = forward ? next_ : prev_;
  compress::ActivationCodec* codec = forward ? codecs_.activation_out : codecs_.gradient_out;
  solvernet::v1::TensorMessage message;
  message.set_kind(kind_of(flow));
  message.set_step(step);
  message.set_micro(micro);
  auto status = [&]() -> Status {
    if (to < 0) return make_error("no stage to send the {} of micro-batch {} to", noun_of(flow), micro);
    if (codec && sample_ids) {
      SN_ASSIGN(*message.mutable_compressed(), codec->encode(tensor.detach().contiguous(), *sample_ids, seed));
    } else {
      model::tensor_to_proto(tensor.detach().contiguous(), message.mutable_tensor());
    }
    return transport_.send(to, std::move(message), net::Traffic::kPipeline);
  }();
  if (!status.ok()) transport_.abort(status.message());
  return status;
}

Result<torch::Tensor> PipelineChannel::receive(Flow flow, int64_t step, int micro,
                                               const std::vector<int64_t>* sample_ids) {
  const bool forward = flow == Flow::kActivation;
  const int from = forward ? prev_ : next_;
  compress::ActivationCodec* codec = forward ? codecs_.activation_in : codecs_.gradient_in;
  auto result = [&]() -> Result<torch::Tensor> {
    if (from < 0) return make_error("no stage to receive the {} of micro-batch {} from", noun_of(flow), micro);
    auto t0 = std::chrono::steady_clock::now();
    auto message = transport_.receive({kind_of(flow), step, micro, 0, 0, from}, timeout_);
    wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!message.ok()) return message.error();
    auto malformed = [&](const std::string& what) {
      return kind_error(ErrorKind::bad_peer, "{} of micro-batch {} from {}: {}", noun_of(flow), micro,
                        transport_.describe(from), what);
    };
    if (message->has_compressed()) {
      if (!codec || !sample_ids) return malformed("compressed tensor received but compression is off");
      auto decoded = codec->decode(message->compressed(), *sample_ids);
      if (!decoded.ok()) return malformed(decoded.message());
      if (!decoded->sizes().equals(shape_)) return malformed("decoded tensor has the wrong shape");
      return decoded->to(torch::kFloat32).contiguous();
    }
    auto dense = model::tensor_from_proto(message->tensor(), torch::kFloat32, shape_);
    if (!dense.ok()) return malformed(dense.message());
    return dense;
  }();
  if (!result.ok()) transport_.abort(result.message());
  return result;
}

double PipelineChannel::take_wait_seconds() { return std::exchange(wait_seconds_, 0.0); }

}  // namespace sn::train
