#include "train/diloco.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "core/fs.h"
#include "model/tensor_wire.h"
#include "net/collectives.h"
#include "net/probe.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"
#include "train/batches.h"
#include "train/stage_worker.h"

namespace sn::train {

namespace {
constexpr const char* kThetaName = "diloco.theta_start";
constexpr const char* kMomentumName = "diloco.outer_momentum";
constexpr const char* kInt8Codec = "diloco-int8";

torch::Tensor flatten_parameters(const NamedTensors& parameters) {
  std::vector<torch::Tensor> parts;
  for (const auto& [name, p] : parameters) parts.push_back(p.detach().reshape({-1}));
  return torch::cat(parts).contiguous().clone();
}

int64_t chunk_count(const std::vector<int64_t>& sizes) {
  int64_t n = 0;
  for (int64_t s : sizes) n += (s + kDilocoChunk - 1) / kDilocoChunk;
  return n;
}
}  // namespace

std::string encode_int8_chunks(const torch::Tensor& flat, const std::vector<int64_t>& sizes) {
  const float* x = flat.data_ptr<float>();
  const int64_t chunks = chunk_count(sizes);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  std::string out(static_cast<size_t>(chunks * 4 + total), '\0');
  auto* scales = reinterpret_cast<uint8_t*>(out.data());
  auto* q = reinterpret_cast<int8_t*>(out.data() + chunks * 4);
  int64_t offset = 0, chunk = 0;
  for (int64_t size : sizes) {
    for (int64_t begin = 0; begin < size; begin += kDilocoChunk, ++chunk) {
      const int64_t end = std::min(size, begin + kDilocoChunk);
      float largest = 0.0f;
      for (int64_t i = begin; i < end; ++i) largest = std::max(largest, std::fabs(x[offset + i]));
      const float scale = largest / 127.0f;
      std::memcpy(scales + chunk * 4, &scale, 4);  // little-endian hosts only (as the rest of the wire)
      for (int64_t i = begin; i < end; ++i) {
        float v = scale > 0.0f ? std::nearbyint(x[offset + i] / scale) : 0.0f;
        v = std::clamp(v, -127.0f, 127.0f);
        q[offset + i] = static_cast<int8_t>(v);
      }
    }
    offset += size;
  }
  return out;
}

Result<torch::Tensor> decode_int8_chunks(std::string_view data, const std::vector<int64_t>& sizes,
                                         const std::string& from) {
  const int64_t chunks = chunk_count(sizes);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  if (static_cast<int64_t>(data.size()) != chunks * 4 + total)
    return kind_error(ErrorKind::bad_peer, "{} sent an int8 pseudo-gradient of {} bytes, expected {}", from,
                      data.size(), chunks * 4 + total);
  torch::Tensor out = torch::empty({total}, torch::kFloat32);
  float* y = out.data_ptr<float>();
  const auto* scales = reinterpret_cast<const uint8_t*>(data.data());
  const auto* q = reinterpret_cast<const int8_t*>(data.data() + chunks * 4);
  int64_t offset = 0, chunk = 0;
  for (int64_t size : sizes) {
    for (int64_t begin = 0; begin < size; begin += kDilocoChunk, ++chunk) {
      const int64_t end = std::min(size, begin + kDilocoChunk);
      float scale = 0;
      std::memcpy(&scale, scales + chunk * 4, 4);
      if (!std::isfinite(scale) || scale < 0)
        return kind_error(ErrorKind::bad_peer, "{} sent an int8 pseudo-gradient with a bad scale", from);
      for (int64_t i = begin; i < end; ++i) y[offset + i] = static_cast<float>(q[offset + i]) * scale;
    }
    offset += size;
  }
  return out;
}

DilocoOuter::DilocoOuter(DilocoConfig config, const NamedTensors& parameters) : config_(std::move(config)) {
  for (const auto& [name, p] : parameters) sizes_.push_back(p.numel());
  theta_start_ = flatten_parameters(parameters);
  momentum_ = torch::zeros_like(theta_start_);
}

Status DilocoOuter::step(net::Transport& transport, const std::vector<int>& ring, int64_t step, int attempt,
                         std::chrono::milliseconds timeout, const NamedTensors& parameters) {
  const torch::Tensor theta = flatten_parameters(parameters);
  const torch::Tensor delta = (theta_start_ - theta).contiguous();
  const int64_t n = theta.numel();
  solvernet::v1::TensorMessage own;
  if (config_.pseudo_grad == "int8") {
    auto* compressed = own.mutable_compressed();
    compressed->set_codec(kInt8Codec);
    compressed->add_shape(n);
    compressed->set_data(encode_int8_chunks(delta, sizes_));
  } else {
    own = net::f32_message(std::span<const float>(delta.data_ptr<float>(), static_cast<size_t>(n)));
  }
  net::CollectiveOptions options;
  options.timeout = timeout;
  // A retry's tags must differ from the failed attempt's: those were accepted
  // (replay protection) or may still sit in an inbox.
  options.kind = attempt == 0 ? std::string("outer") : fmt::format("outer-retry-{}", attempt);
  options.abort_on_error = false;
  // An all-gather, not a ring all-reduce: every replica then adds the same
  // decoded terms in the same order, whatever offset a tensor has in its
  // stage's buffer (a ring's summation order depends on the chunk).
  SN_ASSIGN(auto gathered, net::RingAllgather(transport, ring, options).run(std::move(own), step));
  torch::Tensor sum = torch::zeros({n}, torch::kFloat32);
  float* s = sum.data_ptr<float>();
  for (size_t k = 0; k < gathered.size(); ++k) {
    const auto& message = gathered[k];
    const std::string from = transport.describe(ring[k]);
    torch::Tensor term;
    if (config_.pseudo_grad == "int8") {
      if (!message.has_compressed() || message.compressed().codec() != kInt8Codec) {
        auto error = kind_error(ErrorKind::bad_peer, "{} sent a pseudo-gradient that is not {}", from, kInt8Codec);
        transport.abort(error.message);
        return error;
      }
      auto decoded = decode_int8_chunks(message.compressed().data(), sizes_, from);
      if (!decoded.ok()) {
        transport.abort(decoded.message());
        return decoded.error();
      }
      term = *decoded;
    } else {
      term = torch::empty({n}, torch::kFloat32);
      if (auto read = net::read_f32(message, std::span<float>(term.data_ptr<float>(), static_cast<size_t>(n)), from);
          !read.ok()) {
        transport.abort(read.message());
        return read;
      }
    }
    const float* t = term.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) s[i] += t[i];
  }
  // Scalar loops from here on: the same IEEE operations in the same order on
  // every replica (no vectorised kernel whose lanes might fuse or reorder).
  const float count = static_cast<float>(gathered.size());
  const float mu = static_cast<float>(config_.outer_momentum), lr = static_cast<float>(config_.outer_lr);
  float* v = momentum_.data_ptr<float>();
  float* start = theta_start_.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float mean = s[i] / count;
    v[i] = mu * v[i] + mean;
    const float update = mean + mu * v[i];
    start[i] = start[i] - lr * update;
  }
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const auto& [name, p] : parameters) {
    p.copy_(theta_start_.slice(0, offset, offset + p.numel()).view(p.sizes()));
    offset += p.numel();
  }
  ++outer_steps_;
  return ok_status();
}

Hash256 DilocoOuter::replica_hash(const NamedTensors& parameters) const {
  Hasher h;
  h.update("diloco-replica");
  const Hash256 weights = parameters_hash(parameters);
  h.update(std::span<const uint8_t>(weights.data(), weights.size()));
  h.update(std::span<const uint8_t>(static_cast<const uint8_t*>(momentum_.data_ptr()),
                                    static_cast<size_t>(momentum_.numel()) * 4));
  return h.finish();
}

NamedTensors DilocoOuter::state() const { return {{kThetaName, theta_start_}, {kMomentumName, momentum_}}; }

Status DilocoOuter::load_state(const std::map<std::string, torch::Tensor>& tensors) {
  for (auto [name, target] : {std::pair{kThetaName, &theta_start_}, std::pair{kMomentumName, &momentum_}}) {
    auto it = tensors.find(name);
    if (it == tensors.end()) return make_error("lacks the DiLoCo outer state {}", name);
    if (it->second.numel() != target->numel() || it->second.scalar_type() != torch::kFloat32)
      return make_error("DiLoCo outer state {} has {} values, the stage {}", name, it->second.numel(), target->numel());
    *target = it->second.reshape({-1}).contiguous().clone();
  }
  return ok_status();
}

Hash256 dataset_hash(const std::vector<int32_t>& tokens) {
  return Hasher()
      .update(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(tokens.data()), tokens.size() * 4))
      .finish();
}

Result<model::Dataset> open_dataset(const std::filesystem::path& data_dir, const JobConfig& job, std::string_view hash) {
  if (hash.size() != 32) return input_error("the dataset hash has {} bytes, not 32", hash.size());
  const std::string hex = to_hex(as_bytes(hash));
  const auto path = data_dir / "datasets" / (hex + ".ids");
  auto make = [&](std::vector<int32_t> tokens) {
    return model::Dataset(std::move(tokens), job.model.seq_len, job.data.holdout_fraction);
  };
  if (auto stored = read_file(path); stored.ok()) {
    std::vector<int32_t> tokens(stored->size() / 4);
    std::memcpy(tokens.data(), stored->data(), tokens.size() * 4);
    const Hash256 got = dataset_hash(tokens);
    if (stored->size() % 4 == 0 && std::string_view(reinterpret_cast<const char*>(got.data()), 32) == hash)
      return make(std::move(tokens));
    spdlog::warn("{} does not hash to its name: tokenizing the corpus again", path.string());
  }
  SN_ASSIGN(auto corpus, model::prepare_corpus(job.data, static_cast<int>(job.model.vocab)));
  const Hash256 own = dataset_hash(corpus.tokens);
  if (std::string_view(reinterpret_cast<const char*>(own.data()), 32) != hash)
    return kind_error(ErrorKind::not_found, "dataset {} is not on this node (its data.corpus tokenizes to {})",
                      hex.substr(0, 16), to_hex(own).substr(0, 16));
  SN_TRY(ensure_directory(path.parent_path()));
  SN_TRY(write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(corpus.tokens.data()),
                                                  corpus.tokens.size() * 4)));
  return make(std::move(corpus.tokens));
}

solvernet::v1::RunStepRequest with_own_micro_batches(const solvernet::v1::RunStepRequest& request,
                                                     const JobConfig& job, const model::Dataset& dataset, int stage,
                                                     int replica) {
  solvernet::v1::RunStepRequest filled = request;
  const auto batches = step_batches(job, dataset, request.step());
  for (const auto& mb : batches[static_cast<size_t>(replica)]) {
    auto* out = filled.add_micro_batches();
    for (int64_t id : mb.sample_ids) out->add_sample_ids(id);
    if (stage == 0) model::tensor_to_proto(mb.tokens, out->mutable_tokens());
    if (stage == job.parallel.stages - 1) model::tensor_to_proto(mb.targets, out->mutable_targets());
  }
  return filled;
}

std::vector<grpc::Status> run_members(const std::vector<size_t>& members, const std::vector<int>& group,
                                      std::chrono::milliseconds deadline,
                                      const std::function<grpc::Status(size_t, grpc::ClientContext&)>& call) {
  const size_t n = members.size();
  std::vector<grpc::Status> statuses(n);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  for (size_t k = 0; k < n; ++k) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + deadline);
  }
  std::mutex mutex;
  std::vector<std::thread> threads;
  for (size_t k = 0; k < n; ++k)
    threads.emplace_back([&, k] {
      grpc::Status status = call(members[k], *contexts[k]);
      std::lock_guard<std::mutex> lock(mutex);
      statuses[k] = status;
      // The rest of this group cannot finish the step without this member.
      if (!status.ok())
        for (size_t j = 0; j < n; ++j)
          if (j != k && group[j] == group[k]) contexts[j]->TryCancel();
    });
  for (auto& t : threads) t.join();
  return statuses;
}

void StepDeadline::record(double step_seconds) {
  recent_.push_back(step_seconds);
  while (recent_.size() > window_) recent_.pop_front();
}

double StepDeadline::p95_seconds() const {
  if (recent_.empty()) return 0;
  std::vector<double> sorted(recent_.begin(), recent_.end());
  std::sort(sorted.begin(), sorted.end());
  const auto at = static_cast<size_t>(std::ceil(0.95 * static_cast<double>(sorted.size()))) - 1;
  return sorted[std::min(at, sorted.size() - 1)];
}

std::chrono::milliseconds StepDeadline::deadline() const {
  if (recent_.empty()) return std::max(initial_, net::adaptive_timeout(floor_, rtt_ms_, 0));
  return net::adaptive_timeout(floor_, rtt_ms_, p95_seconds());
}

double measure_client_rtt_ms(const std::vector<std::pair<std::string, std::string>>& address_and_node_id) {
  double slowest = 0;
  for (const auto& [address, node_id] : address_and_node_id) {
    auto stub = solvernet::v1::Node::NewStub(net::make_channel(address, node_id));
    double best = -1;
    for (int attempt = 0; attempt < 3; ++attempt) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      solvernet::v1::PingRequest request;
      solvernet::v1::PingReply reply;
      const auto started = std::chrono::steady_clock::now();
      if (!stub->Ping(&context, request, &reply).ok()) continue;
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
      best = best < 0 ? ms : std::min(best, ms);
    }
    slowest = std::max(slowest, best);
  }
  return slowest;
}

}  // namespace sn::train
