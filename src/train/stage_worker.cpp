#include "train/stage_worker.h"

#include <spdlog/spdlog.h>

#include <sodium.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "core/fs.h"
#include "core/hash.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "net/collectives.h"
#include "net/failure_cause.h"
#include "train/allreduce.h"
#include "train/diloco.h"
#include "train/trace.h"
#include "train/step_transport.h"

namespace sn::train {

using Clock = std::chrono::steady_clock;

namespace {
// Uniform noise in [-SCALE, SCALE) shaped like LIKE, from SEED alone
// (mt19937_64's sequence is fixed by the standard): what the cheats add.
torch::Tensor cheat_noise(const torch::Tensor& like, uint64_t seed, double scale) {
  std::mt19937_64 rng(seed);
  std::vector<float> values(static_cast<size_t>(like.numel()));
  for (auto& v : values) v = static_cast<float>((static_cast<double>(rng() >> 40) / double(1 << 24) * 2.0 - 1.0) * scale);
  return torch::from_blob(values.data(), like.sizes(), torch::kFloat32).clone();
}
}  // namespace

std::vector<ScheduleOp> pipeline_schedule(const std::string& kind, int stage, int stages,
                                          int micro_batches) {
  std::vector<ScheduleOp> ops;
  if (kind == "gpipe") {
    for (int m = 0; m < micro_batches; ++m) ops.push_back({true, m});
    for (int m = 0; m < micro_batches; ++m) ops.push_back({false, m});
    return ops;
  }
  // 1F1B: a stage runs (stages - stage - 1) forwards ahead, then alternates, so
  // at most that many activations are held at once.
  int warmup = std::min(stages - stage - 1, micro_batches);
  int next_forward = 0, next_backward = 0;
  for (; next_forward < warmup; ++next_forward) ops.push_back({true, next_forward});
  while (next_forward < micro_batches) {
    ops.push_back({true, next_forward++});
    ops.push_back({false, next_backward++});
  }
  while (next_backward < micro_batches) ops.push_back({false, next_backward++});
  return ops;
}

torch::Tensor flatten_gradients(const NamedTensors& parameters) {
  std::vector<torch::Tensor> parts;
  for (const auto& [name, p] : parameters) {
    torch::Tensor g = p.grad();
    parts.push_back(g.defined() ? g.reshape({-1}) : torch::zeros({p.numel()}, p.options()));
  }
  return torch::cat(parts).contiguous();
}

void unflatten_gradients(const torch::Tensor& flat, const NamedTensors& parameters) {
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const auto& [name, p] : parameters) {
    torch::Tensor slice = flat.slice(0, offset, offset + p.numel()).view(p.sizes());
    if (p.grad().defined())
      p.mutable_grad().copy_(slice);
    else
      p.mutable_grad() = slice.clone();
    offset += p.numel();
  }
}

Hash256 parameters_hash(const NamedTensors& parameters) {
  Hasher h;
  for (const auto& [name, p] : parameters) {
    h.update(name);
    torch::Tensor c = p.detach().contiguous();
    for (int64_t d : c.sizes()) h.update_u64(static_cast<uint64_t>(d));
    h.update(std::span<const uint8_t>(static_cast<const uint8_t*>(c.data_ptr()),
                                      static_cast<size_t>(c.numel()) * c.element_size()));
  }
  return h.finish();
}

net::InboxLimits job_inbox_limits(const JobConfig& job, int64_t stage_parameters, bool compressed_gradients) {
  constexpr int64_t kF32 = 4, kHeaderBytes = 1024, kCodecSlackBytes = 64 << 10;
  const int64_t micro_batches = job.parallel.micro_batches;
  const int64_t replicas = job.parallel.replicas;
  const int64_t activation_bytes =
      job.sequences_per_micro_batch() * job.model.seq_len * job.model.d_model * kF32;
  // One neighbour sends this stage either its activations or their gradients.
  // Codecs may exceed the dense size (top-k sends indices and values).
  int64_t bytes = micro_batches * (2 * activation_bytes + kCodecSlackBytes);
  int64_t messages = micro_batches;
  // The replica ring: the predecessor sends at most the whole buffer, both
  // phases; through a compressor it forwards D − 1 compressed buffers.
  const int64_t gradient_bytes = stage_parameters * kF32;
  const int64_t ring_messages = net::RingAllreduce::messages_per_member(
      stage_parameters, static_cast<int>(replicas), job.parallel.allreduce_chunk_bytes);
  if (compressed_gradients) {
    bytes += (replicas - 1) * (2 * gradient_bytes + kCodecSlackBytes);
    messages += replicas - 1;
  } else {
    bytes += 2 * gradient_bytes + ring_messages * kHeaderBytes;
    messages += ring_messages;
  }
  // [diloco]: an outer step's all-gather forwards D − 1 whole pseudo-gradients (f32 at most).
  if (job.diloco.enabled) {
    bytes += (replicas - 1) * (gradient_bytes + kCodecSlackBytes);
    messages += replicas;
  }
  // Secure aggregation: keys, shares and a reveal per sender beside its
  // masked vector (no larger than the ring's share).
  if (job.privacy.secure_aggregation) messages += 3 + ring_messages;
  // The tied embedding's swap between the first and the last stage.
  bytes += 2 * job.model.vocab * job.model.d_model * kF32 + kCodecSlackBytes;
  messages += 1;
  bytes += messages * kHeaderBytes;
  return net::InboxLimits{2 * bytes + (int64_t{1} << 20), 2 * messages + 16};
}

std::vector<net::MemberInfo> StageWorker::members_of(const solvernet::v1::SetupJobRequest& request) const {
  std::vector<net::MemberInfo> members;
  for (int i = 0; i < request.members_size(); ++i) {
    const auto& m = request.members(i);
    net::MemberInfo info;
    info.node_id = m.node_id();
    std::memcpy(info.public_key.data(), m.public_key().data(), std::min<size_t>(32, m.public_key().size()));
    info.address = m.address();
    info.region = m.region();
    info.stage = m.stage();
    info.replica = m.replica();
    members.push_back(std::move(info));
  }
  return members;
}

Result<std::unique_ptr<StageWorker>> StageWorker::build(const solvernet::v1::SetupJobRequest& request,
                                                        const std::filesystem::path& data_dir,
                                                        std::chrono::milliseconds peer_timeout,
                                                        const CheckpointStore* restore_from, int64_t restore_step,
                                                        std::optional<LoadedCheckpoint>& restored, bool offline) {
  std::unique_ptr<StageWorker> w(new StageWorker());
  w->offline_ = offline;
  w->job_id_ = request.job_id();
  if (w->job_id_.empty() || w->job_id_.size() > 128) return make_error("job id must be 1..128 characters");
  for (char c : w->job_id_)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return make_error("job id \"{}\" may only hold letters, digits, '-', '_' and '.'", w->job_id_);
  SN_ASSIGN(w->job_, parse_job_string(request.job_toml(), "job from client"));
  w->stage_ = request.stage();
  w->replica_ = request.replica();
  w->stages_ = static_cast<int>(w->job_.parallel.stages);
  w->replicas_ = static_cast<int>(w->job_.parallel.replicas);
  w->data_dir_ = data_dir;
  w->dataset_samples_ = request.dataset_samples();
  // A verifiable job keeps every checkpoint for the challenge window.
  w->checkpoints_ = std::make_unique<CheckpointStore>(
      checkpoint_dir(data_dir, w->job_id_, w->stage_, w->replica_),
      w->job_.verify.enabled ? std::numeric_limits<int64_t>::max() : w->job_.train.checkpoint_keep);
  w->peer_timeout_ = peer_timeout;
  if (w->stage_ < 0 || w->stage_ >= w->stages_ || w->replica_ < 0 || w->replica_ >= w->replicas_)
    return make_error("role stage {} replica {} is outside the job's {} × {}", w->stage_, w->replica_,
                      w->stages_, w->replicas_);
  if (request.members_size() != w->stages_ * w->replicas_)
    return make_error("job lists {} members, expected stages × replicas = {}", request.members_size(),
                      w->stages_ * w->replicas_);
  const auto& model_config = w->job_.model;
  if (request.layer_count() < 1 || request.first_layer() < 0 ||
      request.first_layer() + request.layer_count() > model_config.layers)
    return make_error("layers [{}, {}) are outside the model's {} layers", request.first_layer(),
                      request.first_layer() + request.layer_count(), model_config.layers);
  for (int i = 0; i < request.members_size(); ++i) {
    const auto& m = request.members(i);
    PublicKey key{};
    if (m.public_key().size() != 32) return make_error("member {} has a public key of {} bytes", i, m.public_key().size());
    std::memcpy(key.data(), m.public_key().data(), 32);
    if (node_id_of(key) != m.node_id()) return make_error("member {}: node id does not match its public key", i);
    if (m.stage() * w->replicas_ + m.replica() != i)
      return make_error("member {} has role stage {} replica {}, out of order", i, m.stage(), m.replica());
    w->member_node_ids_.push_back(m.node_id());
  }

  w->model_ = std::make_unique<model::StageModel>(model_config, request.first_layer(),
                                                  request.layer_count(), w->job_.train.seed);
  w->parameters_ = w->model_->named_parameters();
  if (!request.initial_weights().empty()) {
    SN_ASSIGN(auto weights, model::load_safetensors_bytes(request.initial_weights()));
    std::map<std::string, torch::Tensor> by_name(weights.begin(), weights.end());
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : w->parameters_) {
      auto it = by_name.find(name);
      if (it == by_name.end()) return make_error("initial weights lack tensor {}", name);
      if (!it->second.sizes().equals(p.sizes()))
        return make_error("initial weights: tensor {} has the wrong shape", name);
      p.copy_(it->second);
    }
  }
  w->optimizer_ = std::make_unique<AdamW>(w->parameters_, w->job_.train);
  if (w->job_.diloco.enabled) {
    w->diloco_ = std::make_unique<DilocoOuter>(w->job_.diloco, w->parameters_);
    if (!request.dataset_hash().empty()) {
      SN_ASSIGN(auto dataset, open_dataset(data_dir, w->job_, request.dataset_hash()));
      if (dataset.train_samples() != request.dataset_samples())
        return make_error("dataset {} has {} training samples here, the client counts {}",
                          to_hex(as_bytes(request.dataset_hash())).substr(0, 16), dataset.train_samples(),
                          request.dataset_samples());
      w->dataset_ = std::make_unique<model::Dataset>(std::move(dataset));
    }
  }
  w->buffer_dir_ = data_dir / "compress" / w->job_id_;
  if (restore_from) {
    // Read and check the whole checkpoint first: its AQ-SGD buffer files must
    // be in place before the codecs open (and lock) theirs.
    // This node's own copy (put there by the client, or kept): one that does
    // not load, or is another role's (a file copied over it, a mix-up of
    // dirs), is a fault of this node's disk, not a lie. Said as unavailable,
    // so the client sets the role up again from another copy (its mirror).
    // (A replay's checkpoint is the verifier's download: its errors stay its own.)
    // The client acts on the typed cause (FailureCause LOCAL_DATA); the text is for people.
    const auto local_data = [](const std::string& why) {
      return net::with_failure_cause(
          kind_error(ErrorKind::unavailable, "{} (local data: restore this role from another copy)", why),
          solvernet::v1::FailureCause::LOCAL_DATA);
    };
    auto loaded = restore_from->load(restore_step);
    if (!loaded.ok() && !offline) return local_data(loaded.message());
    SN_ASSIGN(restored, std::move(loaded));
    if (auto other = checkpoint_role_mismatch(restored->manifest, w->job_id_, w->stage_, w->replica_, request.replanned());
        other && !offline)
      return local_data(fmt::format("{}: {}", restore_from->manifest_path(restore_step).string(), *other));
    if (w->job_.compression.activations != "none") SN_TRY(ensure_directory(w->buffer_dir_));
    for (const auto& [name, path] : w->buffer_files()) {
      const std::string file = fmt::format("step-{:012d}.{}.buf", restore_step, name);
      const bool listed = std::any_of(restored->manifest.files.begin(), restored->manifest.files.end(),
                                      [&](const CheckpointFile& f) { return f.name == file; });
      if (!listed) continue;  // a checkpoint without buffers: they go on from the live files
      std::error_code ec;
      const auto source = restore_from->dir() / file;
      std::filesystem::copy_file(source, path, std::filesystem::copy_options::overwrite_existing, ec);
      if (ec) {
        std::error_code ignored;
        std::filesystem::remove(path, ignored);  // a partial buffer must not be taken for this step's
        // copy_file's sendfile reports a full tmpfs as EIO: ask the filesystem whether the copy fits.
        const auto room = std::filesystem::space(path.parent_path(), ignored).available;
        const auto needed = std::filesystem::file_size(source, ignored);
        if (ec.value() == ENOSPC || ec.value() == EDQUOT || (!ignored && room < needed))
          return kind_error(ErrorKind::resource_exhausted, "{}: disk full ({}; restoring it from {} needs {} bytes)",
                            path.string(), ec.message(), source.string(), needed);
        return make_error("cannot restore {} from {}: {}", path.string(), source.string(), ec.message());
      }
    }
  }
  if (!restore_from && !w->offline_)
    // A fresh start (also a job set up again from step 0 after a failure)
    // begins with empty buffers, not those a failed run left behind.
    for (const auto& [name, path] : w->buffer_files()) {
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
  if (w->job_.compression.activations != "none") {
    // Each side of each boundary keeps its own buffer file: sender and receiver
    // evolve theirs identically (AQ-SGD) and the codec checks they agree.
    SN_TRY(ensure_directory(w->buffer_dir_));
    std::map<std::string, std::filesystem::path> paths;
    for (const auto& [name, path] : w->buffer_files()) paths[name] = path;
    auto buffer = [&](const std::string& name) {
      compress::ActivationBufferOptions options;
      options.path = paths.at(name);
      options.num_samples = std::max<int64_t>(1, request.dataset_samples());
      options.sample_shape = {model_config.seq_len, model_config.d_model};
      return options;
    };
    const bool first = w->stage_ == 0, last = w->stage_ == w->stages_ - 1;
    if (!last) {
      SN_ASSIGN(w->forward_out_, compress::make_activation_codec(w->job_.compression, true, buffer("fwd-out")));
      SN_ASSIGN(w->backward_in_, compress::make_activation_codec(w->job_.compression, false, buffer("bwd-in")));
    }
    if (!first) {
      SN_ASSIGN(w->forward_in_, compress::make_activation_codec(w->job_.compression, true, buffer("fwd-in")));
      SN_ASSIGN(w->backward_out_, compress::make_activation_codec(w->job_.compression, false, buffer("bwd-out")));
    }
  }
  if (w->job_.compression.gradients != "none") {
    if (w->replicas_ > 1) {
      SN_ASSIGN(w->replica_compressor_, compress::make_gradient_compressor(
                                            w->job_.compression, w->parameter_count(),
                                            static_cast<uint64_t>(w->replica_)));
    }
    // Salted by stage, not replica: every replica of a stage holds the same summed
    // gradient and residual, so they all send the same message and stay identical.
    const bool ends = w->stage_ == 0 || w->stage_ == w->stages_ - 1;
    for (const auto& [name, p] : w->parameters_) {
      if (w->stages_ == 1 || !ends || name != "wte.weight") continue;
      SN_ASSIGN(w->tied_compressor_, compress::make_gradient_compressor(
                                         w->job_.compression, p.numel(), static_cast<uint64_t>(w->stage_)));
    }
  }
  return w;
}

std::vector<std::pair<std::string, std::filesystem::path>> StageWorker::buffer_files() const {
  std::vector<std::pair<std::string, std::filesystem::path>> out;
  if (job_.compression.activations == "none") return out;
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  for (const char* name : {"fwd-out", "fwd-in", "bwd-out", "bwd-in"}) {
    const bool out_side = name[4] == 'o';
    const bool fwd = name[0] == 'f';
    // fwd-out, bwd-in: towards the next stage; fwd-in, bwd-out: towards the previous.
    const bool towards_next = fwd == out_side;
    if ((towards_next && last) || (!towards_next && first)) continue;
    out.emplace_back(name, buffer_dir_ / fmt::format("stage{}-replica{}-{}.buf", stage_, replica_, name));
  }
  return out;
}

Status StageWorker::attach(std::shared_ptr<net::Transport> link, const std::string& self_node_id) {
  transport_ = std::make_shared<StepRecorder>(std::move(link), job_id_, self_node_id);
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  pipeline_ = std::make_unique<PipelineChannel>(
      *transport_, first ? -1 : member(stage_ - 1, replica_), last ? -1 : member(stage_ + 1, replica_),
      std::vector<int64_t>{job_.sequences_per_micro_batch(), job_.model.seq_len, job_.model.d_model},
      PipelineChannel::Codecs{forward_out_.get(), forward_in_.get(), backward_out_.get(), backward_in_.get()},
      peer_timeout_);
  return ok_status();
}

Result<std::unique_ptr<StageWorker>> StageWorker::create(const solvernet::v1::SetupJobRequest& request,
                                                         const NodeKey& key,
                                                         const std::filesystem::path& data_dir,
                                                         std::chrono::milliseconds peer_timeout,
                                                         net::DeliveryService& delivery, Cheat cheat) {
  std::optional<LoadedCheckpoint> restored;
  std::optional<CheckpointStore> store;
  if (request.start_step() > 0)
    store.emplace(checkpoint_dir(data_dir, request.job_id(), request.stage(), request.replica()), 1);
  SN_ASSIGN(auto w, build(request, data_dir, peer_timeout, store ? &*store : nullptr, request.start_step(), restored,
                          false));
  w->cheat_ = cheat;
  w->cheat_first_ = cheat.first_step(w->job_.train.steps);
  const int self = w->member(w->stage_, w->replica_);
  if (w->member_node_ids_[static_cast<size_t>(self)] != key.node_id())
    return make_error("the job assigns stage {} replica {} to node {}, not to this node", w->stage_, w->replica_,
                      w->member_node_ids_[static_cast<size_t>(self)].substr(0, 8));
  std::optional<Topology> topology;
  if (!request.topology_toml().empty()) {
    SN_ASSIGN(topology, parse_topology_string(request.topology_toml(), "topology from client"));
  }
  EmulationScale scale;
  if (request.time_dilation() > 0) scale.time_dilation = request.time_dilation();
  if (request.byte_ratio() > 0) scale.byte_ratio = request.byte_ratio();
  if (request.gradient_byte_ratio() > 0) scale.gradient_byte_ratio = request.gradient_byte_ratio();
  SN_ASSIGN(w->live_, net::JobTransport::create(w->job_id_, key, w->members_of(request), self,
                                                topology ? &*topology : nullptr, scale,
                                                job_inbox_limits(w->job_, w->parameter_count(),
                                                                 w->job_.compression.gradients != "none")));
  SN_TRY(w->attach(w->live_, key.node_id()));
  SN_TRY(w->attach_privacy(w->transport_.get(), &key, request));
  if (restored) {
    SN_TRY(w->apply_checkpoint(std::move(*restored), store->manifest_path(request.start_step()).string(),
                               request.replanned()));
    w->live_->finish_step(request.start_step() - 1);
  }
  if (cheat.strategy == Cheat::Strategy::random_weights) w->apply_weight_cheat(-1);
  SN_TRY(w->start_evidence(request));
  w->registration_ = delivery.add(w->live_);
  return w;
}

Result<std::unique_ptr<StageWorker>> StageWorker::create_offline(const solvernet::v1::SetupJobRequest& request,
                                                                 std::shared_ptr<net::Transport> link,
                                                                 const std::filesystem::path& checkpoint_dir,
                                                                 int64_t checkpoint_step,
                                                                 const std::filesystem::path& scratch_dir, Cheat cheat) {
  std::optional<LoadedCheckpoint> restored;
  CheckpointStore store(checkpoint_dir, 1);
  SN_ASSIGN(auto w, build(request, scratch_dir, std::chrono::milliseconds(1), &store, checkpoint_step, restored, true));
  w->cheat_ = cheat;
  w->cheat_first_ = cheat.first_step(w->job_.train.steps);
  const int self = w->member(w->stage_, w->replica_);
  SN_TRY(w->attach(std::move(link), w->member_node_ids_[static_cast<size_t>(self)]));
  SN_TRY(w->attach_privacy(nullptr, nullptr, request));
  SN_TRY(w->apply_checkpoint(std::move(*restored), store.manifest_path(checkpoint_step).string(), false));
  const Hash256 state = w->state_hash();
  w->start_leaf_ = step_leaf(checkpoint_step, state, Hash256{}, Hash256{});
  return w;
}

StageWorker::~StageWorker() = default;

void StageWorker::abort(const std::string& reason) {
  if (transport_) transport_->abort(reason);
}
int64_t StageWorker::parameter_count() const {
  int64_t n = 0;
  for (const auto& [name, p] : parameters_) n += p.numel();
  return n;
}

uint64_t StageWorker::shared_seed(int64_t step, std::string_view purpose, int64_t a, int64_t b) const {
  Hash256 digest = Hasher()
                       .update_u64(job_.train.seed)
                       .update_u64(static_cast<uint64_t>(step))
                       .update(purpose)
                       .update_u64(static_cast<uint64_t>(a))
                       .update_u64(static_cast<uint64_t>(b))
                       .finish();
  uint64_t seed = 0;
  for (int i = 0; i < 8; ++i) seed |= static_cast<uint64_t>(digest[static_cast<size_t>(i)]) << (8 * i);
  return seed;
}

TrainingState StageWorker::training_state() const {
  TrainingState state;
  state.weights = parameters_;
  state.optimizer = optimizer_->state();
  if (replica_compressor_) state.residuals.emplace_back("compress.replica_residual", replica_compressor_->residual());
  if (tied_compressor_) state.residuals.emplace_back("compress.tied_residual", tied_compressor_->residual());
  if (diloco_)
    for (auto& entry : diloco_->state()) state.residuals.push_back(entry);
  for (auto [name, codec] : {std::pair{"fwd-out", forward_out_.get()}, std::pair{"fwd-in", forward_in_.get()},
                             std::pair{"bwd-out", backward_out_.get()}, std::pair{"bwd-in", backward_in_.get()}})
    if (codec)
      if (auto digest = codec->buffer_digest()) state.activation_buffers.emplace_back(name, *digest);
  state.cursor.next_step = steps_done_;
  state.cursor.dataset_samples = dataset_samples_;
  state.cursor.global_batch = job_.train.global_batch;
  state.cursor.replicas = replicas_;
  state.rng.job_seed = job_.train.seed;
  state.rng.stage = stage_;
  state.rng.replica = replica_;
  return state;
}

Status StageWorker::save_checkpoint(const StateDigest& digest) {
  if (offline_) return ok_status();
  // The AQ-SGD buffers live in their own files: make them durable before the
  // manifest that records their digest.
  for (auto* codec : {forward_out_.get(), forward_in_.get(), backward_out_.get(), backward_in_.get()})
    if (codec) SN_TRY(codec->flush());
  TrainingState state = training_state();
  NamedTensors all = state.weights;
  for (auto& entry : state.optimizer) all.push_back(entry);
  for (auto& entry : state.residuals) all.push_back(entry);
  // Checkpoints carry copies of the buffers, so a replay, a resume or a spare
  // taking over this role (docs/resilience.md) starts from any of
  // them bitwise.
  std::vector<std::pair<std::string, std::filesystem::path>> extra;
  {
    const std::map<std::string, compress::ActivationCodec*> codecs{
        {"fwd-out", forward_out_.get()}, {"fwd-in", forward_in_.get()},
        {"bwd-out", backward_out_.get()}, {"bwd-in", backward_in_.get()}};
    for (const auto& [name, path] : buffer_files())
      if (auto* codec = codecs.at(name); codec && codec->buffer_digest()) extra.emplace_back(name + ".buf", path);
  }
  SN_TRY(checkpoints_->save(steps_done_, all,
                            {{"job_id", job_id_}, {"stage", std::to_string(stage_)}, {"replica", std::to_string(replica_)}},
                            digest, extra));
  saved_states_[steps_done_] = digest.root;
  while (saved_states_.size() > 16) saved_states_.erase(saved_states_.begin());
  return ok_status();
}

std::optional<Hash256> StageWorker::saved_state(int64_t step) const {
  const auto it = saved_states_.find(step);
  return it == saved_states_.end() ? std::nullopt : std::optional<Hash256>(it->second);
}

Status StageWorker::apply_checkpoint(LoadedCheckpoint loaded, const std::string& where, bool replanned) {
  const int64_t step = loaded.manifest.step;
  std::map<std::string, torch::Tensor> by_name(loaded.tensors.begin(), loaded.tensors.end());
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : parameters_) {
    auto it = by_name.find(name);
    if (it == by_name.end() || !it->second.sizes().equals(p.sizes()) || it->second.scalar_type() != p.scalar_type())
      return make_error("{}: lacks tensor {} or its shape or dtype differs", where, name);
    p.copy_(it->second);
  }
  if (auto status = optimizer_->load_state(loaded.tensors); !status.ok())
    return make_error("{}: {}", where, status.message());
  for (auto [name, compressor] : {std::pair{"compress.replica_residual", replica_compressor_.get()},
                                  std::pair{"compress.tied_residual", tied_compressor_.get()}}) {
    if (!compressor) continue;
    auto it = by_name.find(name);
    // A re-planned job may compress where the old one did not (a role that
    // had no replicas): the residual starts empty then.
    if (it == by_name.end() && replanned) continue;
    if (it == by_name.end()) return make_error("{}: lacks the gradient compressor's residual {}", where, name);
    if (auto status = compressor->set_residual(it->second); !status.ok())
      return make_error("{}: {}", where, status.message());
  }
  if (diloco_)
    if (auto status = diloco_->load_state(by_name); !status.ok()) return make_error("{}: {}", where, status.message());
  if (optimizer_->steps_taken() != step)
    return make_error("{}: holds step {}, asked to resume at {}", where, optimizer_->steps_taken(), step);
  steps_done_ = step;
  // The restored state must reproduce what the manifest committed to. A
  // checkpoint with buffer copies ([verify] jobs) restored them; one without
  // leaves the live buffer files, which have moved on if steps ran after it
  // (both ends of a boundary alike): training goes on from them, not bitwise
  // the run that never stopped, which the state hash then shows.
  bool buffers_copied = false;
  for (const auto& file : loaded.manifest.files)
    if (file.name.ends_with(".buf")) buffers_copied = true;
  const StateDigest now = training_state_digest(training_state());
  for (size_t p = 0; p < kStateParts; ++p) {
    const auto part = static_cast<StatePart>(p);
    if (now.parts[p] == loaded.manifest.state.parts[p]) continue;
    // Re-planned on fewer replicas: the cursor counts the new replicas, the
    // seeds are the new role's, and the residual of a compressor the new job
    // no longer has went with it (docs/resilience.md, "No spare: re-plan").
    if (replanned && (part == StatePart::cursor || part == StatePart::rng || part == StatePart::residuals)) continue;
    if (part == StatePart::activation_buffers && !buffers_copied && !offline_) {
      spdlog::warn("job {}: the AQ-SGD buffers have moved on since the checkpoint of step {}", job_id_, step);
      continue;
    }
    return make_error("{}: the restored {} part of the state does not reproduce the manifest's state hash (job, "
                      "role or files differ)", where, state_part_name(part));
  }
  return ok_status();
}

void StageWorker::set_tracer(StepTracer* tracer) {
  tracer_ = tracer;
  model_->set_observer(tracer);
}

Hash256 StageWorker::state_hash() const { return training_state_digest(training_state()).root; }

bool StageWorker::cheat_acts(int64_t step) const {
  using S = Cheat::Strategy;
  const int64_t t = step + 1;
  switch (cheat_.strategy) {
    case S::none:
    case S::withhold:
      return false;
    case S::perturb:
    case S::lie_in_leaf:
    case S::wrong_op:
      return t == cheat_first_;
    case S::random_weights:
      return true;
    default:
      return t >= cheat_first_;
  }
}

// Evidence of a [verify] job: the setup as received, leaf_0 (or, resumed at
// step c, leaves.bin cut back to leaf_c) and the checkpoint of step 0.
Status StageWorker::start_evidence(const solvernet::v1::SetupJobRequest& request) {
  const Hash256 state = state_hash();
  start_leaf_ = step_leaf(steps_done_, state, Hash256{}, Hash256{});
  if (cheat_.strategy == Cheat::Strategy::random_weights) randombytes_buf(start_leaf_.data(), start_leaf_.size());
  if (!job_.verify.enabled) return ok_status();
  evidence_dir_ = evidence_dir(data_dir_, job_id_, stage_, replica_);
  SN_TRY(ensure_directory(evidence_dir_));
  SN_TRY(write_file_atomic(setup_evidence_path(evidence_dir_), request.SerializeAsString()));
  const auto leaves = leaves_path(evidence_dir_);
  if (steps_done_ == 0) {
    SN_TRY(write_file_atomic(leaves, std::string_view(reinterpret_cast<const char*>(start_leaf_.data()), 32)));
    SN_TRY(save_checkpoint(training_state_digest(training_state())));
  } else {
    // Resumed: the leaves up to this step stay, later ones (of the run that
    // failed) go; without them this member cannot answer for earlier steps.
    std::error_code ec;
    const auto size = std::filesystem::file_size(leaves, ec);
    const auto keep = static_cast<uintmax_t>(32 * (steps_done_ + 1));
    if (ec || size < keep) {
      spdlog::warn("job {}: no leaves up to step {} here: this member records no evidence", job_id_, steps_done_);
      return ok_status();
    }
    std::filesystem::resize_file(leaves, keep, ec);
    if (ec) return make_error("cannot cut {} back to step {}: {}", leaves.string(), steps_done_, ec.message());
  }
  record_ = true;
  return ok_status();
}

// Noise on the weights (perturb) or, for random-weights, weights that never
// saw the data: drawn from a generator seeded by the step, so a cheater
// tracing its own step reproduces them.
void StageWorker::apply_weight_cheat(int64_t step) {
  torch::NoGradGuard no_grad;
  const double scale = cheat_.strategy == Cheat::Strategy::perturb ? 1e-2 : 1.0;
  int64_t index = 0;
  for (auto& [name, p] : parameters_) p.add_(cheat_noise(p, shared_seed(step, "cheat", stage_, index++), scale));
}

std::string StageWorker::weights_safetensors() const {
  return model::safetensors_bytes(parameters_, {{"job_id", job_id_}, {"step", std::to_string(steps_done_)}});
}


struct StageWorker::StepState {
  const solvernet::v1::RunStepRequest& request;
  int64_t step = 0;
  bool forward_only = false;
  // Per micro-batch, between its forward and its backward.
  std::vector<torch::Tensor> inputs, outputs, losses;
  double loss_sum = 0;
  double reduce_seconds = 0;
  Clock::time_point started = Clock::now();

  std::vector<int64_t> sample_ids(int micro) const {
    const auto& ids = request.micro_batches(micro).sample_ids();
    return std::vector<int64_t>(ids.begin(), ids.end());
  }
  // The sample ids a pipeline crossing is encoded under (kept in STORAGE), or
  // none in evaluation: it goes dense, as held-out ids must not touch the
  // codecs' per-sample buffers.
  const std::vector<int64_t>* codec_ids(int micro, std::vector<int64_t>& storage) const {
    if (forward_only) return nullptr;
    storage = sample_ids(micro);
    return &storage;
  }
};

Status StageWorker::check_step(const solvernet::v1::RunStepRequest& request) const {
  const int micro_batches = request.micro_batches_size();
  if (!request.forward_only() && request.step() != steps_done_)
    return make_error("asked for step {} but this stage has done {} steps", request.step(), steps_done_);
  if (micro_batches < 1 || (!request.forward_only() && micro_batches != job_.parallel.micro_batches))
    return make_error("step has {} micro-batches, the job says {}", micro_batches, job_.parallel.micro_batches);
  return ok_status();
}

// Receive input (tokens at the first stage), forward, then send the output on
// (or keep the loss, at the last stage).
Status StageWorker::forward_micro(StepState& state, int micro) {
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  const int64_t batch = job_.sequences_per_micro_batch(), seq = job_.model.seq_len;
  const auto m = static_cast<size_t>(micro);
  const auto& batch_data = state.request.micro_batches(micro);
  std::vector<int64_t> ids;
  torch::Tensor input;
  if (first) {
    SN_ASSIGN(input, model::tensor_from_proto(batch_data.tokens(), torch::kInt64, std::vector<int64_t>{batch, seq}));
    if (input.min().item<int64_t>() < 0 || input.max().item<int64_t>() >= job_.model.vocab)
      return make_error("micro-batch {} holds token ids outside the vocabulary", micro);
  } else {
    SN_ASSIGN(input, pipeline_->receive(Flow::kActivation, state.step, micro, state.codec_ids(micro, ids)));
    if (!state.forward_only) input.requires_grad_(true);
  }
  if (tracer_) tracer_->on_input(micro, input);
  // wrong-op: one block forward (the stage's first block, micro-batch 0) is
  // corrupted; everything after it is computed honestly from that output.
  const bool wrong_op = !state.forward_only && micro == 0 && cheat_.strategy == Cheat::Strategy::wrong_op &&
                        cheat_acts(state.step);
  if (wrong_op) model_->set_block_offset(model_->first_layer(), 1e-3);
  torch::Tensor output = model_->forward(input);
  if (wrong_op) model_->set_block_offset(model_->first_layer(), 0.0);
  if (last) {
    SN_ASSIGN(auto targets, model::tensor_from_proto(batch_data.targets(), torch::kInt64, std::vector<int64_t>{batch, seq}));
    if (targets.min().item<int64_t>() < 0 || targets.max().item<int64_t>() >= job_.model.vocab)
      return make_error("micro-batch {} holds target ids outside the vocabulary", micro);
    torch::Tensor loss;
    if (!state.forward_only && cheat_.strategy == Cheat::Strategy::less_data && cheat_acts(state.step)) {
      const int64_t kept = std::max<int64_t>(1, batch / 2);
      loss = model::lm_loss(output.slice(0, 0, kept), targets.slice(0, 0, kept));
    } else {
      loss = model::lm_loss(output, targets);
    }
    const double loss_value = loss.item<double>();
    // Backward from here would only spread it into every gradient and weight.
    if (!std::isfinite(loss_value))
      return kind_error(ErrorKind::diverged, "the loss of micro-batch {} is {}", micro, loss_value);
    state.loss_sum += loss_value;
    state.losses[m] = loss;
    if (tracer_) tracer_->on_loss(micro, loss);
  } else {
    const uint64_t seed = shared_seed(state.step, "act", micro, stage_ * replicas_ + replica_);
    torch::Tensor sent = output;
    if (!state.forward_only && cheat_.strategy == Cheat::Strategy::equivocate && cheat_acts(state.step))
      sent = output.detach() + cheat_noise(output, shared_seed(state.step, "cheat-act", micro), 1e-2);
    SN_TRY(pipeline_->send(Flow::kActivation, state.step, micro, sent, state.codec_ids(micro, ids), seed));
    if (tracer_) tracer_->on_send(true, micro, sent);
  }
  if (!state.forward_only) {
    state.inputs[m] = input;
    state.outputs[m] = output;
  }
  return ok_status();
}

// Receive the output's gradient (the scaled loss at the last stage), backward,
// then send the input's gradient back (except at the first stage).
Status StageWorker::backward_micro(StepState& state, int micro) {
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  // The loss is a mean over what the gradient is summed over: every replica's
  // micro-batches, or (DiLoCo, no all-reduce) this replica's own.
  const double scale = 1.0 / static_cast<double>(job_.parallel.micro_batches * (diloco_ ? 1 : replicas_));
  const auto m = static_cast<size_t>(micro);
  std::vector<int64_t> ids;
  if (privacy_ && privacy_->sequence_clip_norm() > 0) {
    SN_TRY(backward_clipped(state, micro));
  } else if (last) {
    (state.losses[m] * scale).backward();
  } else {
    SN_ASSIGN(auto grad, pipeline_->receive(Flow::kGradient, state.step, micro, state.codec_ids(micro, ids)));
    if (tracer_) tracer_->on_output_gradient(micro, grad);
    if (cheat_.strategy == Cheat::Strategy::less_data && cheat_acts(state.step)) {
      // Not the loss's stage: the left-out half's gradient is dropped instead.
      grad = grad.clone();
      grad.slice(0, std::max<int64_t>(1, grad.size(0) / 2)).zero_();
    }
    state.outputs[m].backward(grad);
  }
  if (tracer_) tracer_->on_backward(micro);
  if (!first) {
    const uint64_t seed = shared_seed(state.step, "grad", micro, stage_ * replicas_ + replica_);
    SN_TRY(pipeline_->send(Flow::kGradient, state.step, micro, state.inputs[m].grad(), state.codec_ids(micro, ids), seed));
    if (tracer_) tracer_->on_send(false, micro, state.inputs[m].grad());
  }
  state.inputs[m] = state.outputs[m] = state.losses[m] = torch::Tensor();
  return ok_status();
}

Status StageWorker::backward_clipped(StepState& state, int micro) {
  const bool last = stage_ == stages_ - 1;
  const double scale = 1.0 / static_cast<double>(job_.parallel.micro_batches * replicas_);
  const auto m = static_cast<size_t>(micro);
  const int64_t batch = state.outputs[m].size(0);
  torch::Tensor output_grad, targets;
  std::vector<int64_t> ids;
  if (last) {
    const auto& batch_data = state.request.micro_batches(micro);
    SN_ASSIGN(targets, model::tensor_from_proto(batch_data.targets(), torch::kInt64,
                                                std::vector<int64_t>{batch, job_.model.seq_len}));
  } else {
    SN_ASSIGN(output_grad, pipeline_->receive(Flow::kGradient, state.step, micro, state.codec_ids(micro, ids)));
    if (tracer_) tracer_->on_output_gradient(micro, output_grad);
  }
  // One sequence's share of the step's mean loss is scale / batch of its own
  // mean token loss: clip that gradient at the same fraction of the bound.
  const double bound = privacy_->sequence_clip_norm() * scale / static_cast<double>(batch);
  torch::Tensor sum = sum_clipped_sequence_gradients(parameters_, batch, bound, [&](int64_t b, bool keep_graph) {
    if (last) {
      auto loss = model::lm_loss(state.outputs[m].slice(0, b, b + 1), targets.slice(0, b, b + 1)) *
                  (scale / static_cast<double>(batch));
      loss.backward({}, keep_graph);
    } else {
      torch::autograd::backward({state.outputs[m].slice(0, b, b + 1)}, {output_grad.slice(0, b, b + 1)},
                                keep_graph);
    }
  });
  dp_sum_ = dp_sum_.defined() ? dp_sum_.add_(sum) : sum;
  return ok_status();
}

Status StageWorker::attach_privacy(net::Transport* link, const NodeKey* key,
                                   const solvernet::v1::SetupJobRequest& request) {
  if (!job_.privacy.enabled) return ok_status();
  PrivacyContext context;
  context.job = &job_;
  context.job_id = job_id_;
  context.stage = stage_;
  context.stages = stages_;
  context.replica = replica_;
  context.replicas = replicas_;
  for (int r = 0; r < replicas_; ++r) {
    context.ring.push_back(member(stage_, r));
    PublicKey pk{};
    std::memcpy(pk.data(), request.members(member(stage_, r)).public_key().data(), 32);
    context.ring_keys.push_back(pk);
  }
  context.transport = link;
  context.key = key;
  context.timeout = peer_timeout_;
  context.train_sequences = dataset_samples_;
  for (const auto& [name, p] : parameters_) context.layout.emplace_back(name, p.numel());
  SN_ASSIGN(privacy_, make_privacy_hooks(context));
  return ok_status();
}

// Sum this stage's gradients across its replicas (dense ring, compressed, or
// through the privacy hooks: noise first, then secure aggregation).
Status StageWorker::reduce_replica_gradients(int64_t step) {
  torch::Tensor flat = dp_sum_.defined() ? std::exchange(dp_sum_, torch::Tensor()) : flatten_gradients(parameters_);
  if (privacy_) privacy_->add_noise(flat, step, shared_seed(step, "dp-noise", stage_, replica_));
  if (privacy_ && privacy_->aggregates()) {
    SN_TRY(privacy_->reduce(flat, step));
    unflatten_gradients(flat, parameters_);
    return ok_status();
  }
  std::vector<int> ring;
  for (int r = 0; r < replicas_; ++r) ring.push_back(member(stage_, r));
  RingOptions ring_options;
  ring_options.chunk_bytes = job_.parallel.allreduce_chunk_bytes;
  ring_options.timeout = peer_timeout_;
  if (replica_compressor_) {
    ring_options.kind = "dpgrad";
    SN_TRY(CompressedAllreduce(*transport_, ring, *replica_compressor_, ring_options)
               .run(flat, step, shared_seed(step, "replicas", stage_)));
  } else {
    SN_TRY(ring_allreduce(*transport_, ring, flat, step, ring_options));
  }
  unflatten_gradients(flat, parameters_);
  return ok_status();
}

// The tied embedding lives in the first and the last stage: both add the
// other's gradient (a + b == b + a bitwise) and so stay identical.
Status StageWorker::sync_tied_embedding(int64_t step) {
  const bool first = stage_ == 0, last = stage_ == stages_ - 1;
  if (stages_ == 1 || !(first || last)) return ok_status();
  for (auto& [name, p] : parameters_) {
    if (name != "wte.weight") continue;
    const int peer = first ? member(stages_ - 1, replica_) : member(0, replica_);
    SN_TRY(TiedEmbeddingSync(*transport_, peer, tied_compressor_.get(), peer_timeout_)
               .run(p.mutable_grad(), step, shared_seed(step, "tied")));
  }
  return ok_status();
}

// AdamW, then the checkpoint (every checkpoint_every steps, and every
// segment_steps in a [verify] job) and the state hash.
Status StageWorker::update_weights(int64_t step, solvernet::v1::RunStepReply& reply) {
  using S = Cheat::Strategy;
  const bool skip = (cheat_.strategy == S::skip_steps || cheat_.strategy == S::random_weights) && cheat_acts(step);
  if (!skip) optimizer_->step(step);
  if (cheat_.strategy == S::perturb && cheat_acts(step)) apply_weight_cheat(step);
  ++steps_done_;
  const StateDigest digest = training_state_digest(training_state());
  if (tracer_) tracer_->on_update(training_state(), digest.root);
  const bool periodic = job_.train.checkpoint_every > 0 && steps_done_ % job_.train.checkpoint_every == 0;
  const bool segment = job_.verify.enabled && steps_done_ % job_.verify.segment_steps == 0;
  if (periodic || segment) SN_TRY(save_checkpoint(digest));
  reply.set_state_hash(digest.root.data(), digest.root.size());
  reply.set_replica_hash(digest.replica.data(), digest.replica.size());
  return ok_status();
}

// Waits until every message of the step is delivered, closes the step in the
// inbox (a late or replayed message for it is refused from now on) and
// reports loss, traffic and time.
Status StageWorker::report(StepState& state, solvernet::v1::RunStepReply& reply) {
  SN_TRY(transport_->flush(peer_timeout_));
  if (live_) live_->finish_step(state.step);
  const bool last = stage_ == stages_ - 1;
  reply.set_step(state.step);
  reply.set_loss_sum(state.loss_sum);
  reply.set_loss_count(last ? state.request.micro_batches_size() : 0);
  for (const auto& counter : live_ ? live_->take_counters() : std::vector<net::LinkCounter>{}) {
    auto* sent = reply.add_sent();
    sent->set_to_node_id(member_node_ids_[static_cast<size_t>(counter.to)]);
    sent->set_link_class(counter.link_class);
    sent->set_traffic(net::traffic_name(counter.traffic));
    sent->set_bytes(counter.bytes);
  }
  const double wait_seconds = pipeline_->take_wait_seconds() + state.reduce_seconds;
  const double total = std::chrono::duration<double>(Clock::now() - state.started).count();
  reply.set_wait_seconds(wait_seconds);
  reply.set_compute_seconds(total - wait_seconds);
  return ok_status();
}

Result<solvernet::v1::RunStepReply> StageWorker::run_step(const solvernet::v1::RunStepRequest& request) {
  if (request.outer_sync()) return run_outer_sync(request);
  // A DiLoCo node reads its own shard: the client sent the step number only.
  if (dataset_ && !request.forward_only() && request.micro_batches_size() == 0)
    return run_step(with_own_micro_batches(request, job_, *dataset_, stage_, replica_));
  SN_TRY(check_step(request));
  StepState state{request};
  state.step = request.step();
  state.forward_only = request.forward_only();
  const int micro_batches = request.micro_batches_size();
  state.inputs.resize(static_cast<size_t>(micro_batches));
  state.outputs.resize(state.inputs.size());
  state.losses.resize(state.inputs.size());
  pipeline_->take_wait_seconds();
  transport_->begin_step(record_ && !state.forward_only);

  // Gradients are defined zeros before every step, the first included, so
  // that each micro-batch's accumulation is always "before + its gradient"
  // (an undefined gradient would take the first one as is, whose -0.0 then
  // differs from 0 + -0.0): the operation trace recomputes exactly that.
  for (auto& [name, p] : parameters_)
    if (p.grad().defined())
      p.mutable_grad().zero_();
    else
      p.mutable_grad() = torch::zeros_like(p);
  {
    torch::AutoGradMode grad_mode(!state.forward_only);
    if (tracer_ && !state.forward_only) tracer_->begin(request, training_state(), parameters_);
    std::vector<ScheduleOp> ops;
    if (state.forward_only) {
      for (int m = 0; m < micro_batches; ++m) ops.push_back({true, m});
    } else {
      ops = pipeline_schedule(job_.parallel.schedule, stage_, stages_, micro_batches);
    }
    for (const ScheduleOp& op : ops) SN_TRY(op.forward ? forward_micro(state, op.micro) : backward_micro(state, op.micro));
  }

  solvernet::v1::RunStepReply reply;
  if (!state.forward_only) {
    auto t0 = Clock::now();
    // DiLoCo: no all-reduce between replica groups; they meet at outer steps.
    if (!diloco_) SN_TRY(reduce_replica_gradients(state.step));
    if (tracer_) tracer_->on_reduced();
    SN_TRY(sync_tied_embedding(state.step));
    if (tracer_) tracer_->on_tied();
    state.reduce_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    SN_TRY(update_weights(state.step, reply));
  }
  SN_TRY(report(state, reply));
  if (!state.forward_only) SN_TRY(commit_step(request, reply));
  return reply;
}

Result<solvernet::v1::RunStepReply> StageWorker::run_outer_sync(const solvernet::v1::RunStepRequest& request) {
  if (!diloco_) return input_error("an outer step was asked of a job without [diloco]");
  if (request.step() != steps_done_)
    return make_error("asked for the outer step after {} steps but this stage has done {}", request.step(), steps_done_);
  std::vector<int> ring;
  bool self_in = false;
  int previous = -1;
  for (int r : request.outer_replicas()) {
    if (r <= previous || r >= replicas_)
      return input_error("outer step: replica groups must be ascending and below {}, got {}", replicas_, r);
    previous = r;
    self_in = self_in || r == replica_;
    ring.push_back(member(stage_, r));
  }
  if (!self_in) return input_error("outer step: replica {} is not among the live groups", replica_);
  const int attempt = request.outer_attempt();
  if (attempt < 0 || attempt >= replicas_)
    return input_error("outer step: attempt {} out of range 0..{}", attempt, replicas_ - 1);
  torch::NoGradGuard no_grad;
  if (attempt == 0) {
    outer_undo_step_ = steps_done_;
    outer_undo_parameters_.clear();
    for (const auto& [name, p] : parameters_) outer_undo_parameters_.push_back(p.detach().clone());
    outer_undo_state_.clear();
    for (const auto& [name, t] : diloco_->state()) outer_undo_state_[name] = t.clone();
  } else {
    if (outer_undo_step_ != steps_done_)
      return input_error("outer step: retry {} after {} steps, but no first attempt of that outer step ran here",
                         attempt, steps_done_);
    for (size_t k = 0; k < parameters_.size(); ++k) parameters_[k].second.copy_(outer_undo_parameters_[k]);
    SN_TRY(diloco_->load_state(outer_undo_state_));
  }
  // The groups not listed have left the job: nothing more goes to them.
  if (live_)
    for (int r = 0; r < replicas_; ++r)
      if (std::find(request.outer_replicas().begin(), request.outer_replicas().end(), r) ==
          request.outer_replicas().end())
        for (int s = 0; s < stages_; ++s) live_->exclude(member(s, r));
  const auto started = Clock::now();
  transport_->begin_step(false);
  // Tagged with the next step's number: the last inner step is already
  // closed in the inbox, the next one is not.
  SN_TRY(diloco_->step(*transport_, ring, steps_done_, attempt, peer_timeout_, parameters_));
  SN_TRY(transport_->flush(peer_timeout_));
  (void)transport_->take_step();
  solvernet::v1::RunStepReply reply;
  reply.set_step(request.step());
  for (const auto& counter : live_ ? live_->take_counters() : std::vector<net::LinkCounter>{}) {
    auto* sent = reply.add_sent();
    sent->set_to_node_id(member_node_ids_[static_cast<size_t>(counter.to)]);
    sent->set_link_class(counter.link_class);
    sent->set_traffic(net::traffic_name(counter.traffic));
    sent->set_bytes(counter.bytes);
  }
  const StateDigest digest = training_state_digest(training_state());
  // The outer boundary's state, kept: a node joining the job copies it from
  // here (docs/diloco.md, "Groups that join"). It replaces the checkpoint the
  // last inner step may have written for the same step count.
  SN_TRY(save_checkpoint(digest));
  const Hash256 replica = diloco_->replica_hash(parameters_);
  reply.set_state_hash(digest.root.data(), digest.root.size());
  reply.set_replica_hash(replica.data(), replica.size());
  reply.set_wait_seconds(std::chrono::duration<double>(Clock::now() - started).count());
  return reply;
}

// The step's leaf from the state hash and the traffic the recorder saw; with
// evidence on, the step's file (written, then renamed: a reader never sees
// half of one) and the leaf appended to leaves.bin.
Status StageWorker::commit_step(const solvernet::v1::RunStepRequest& request, solvernet::v1::RunStepReply& reply) {
  using S = Cheat::Strategy;
  auto traffic = transport_->take_step();
  StepOutcome outcome;
  outcome.step = request.step() + 1;
  std::memcpy(outcome.state_hash.data(), reply.state_hash().data(), 32);
  outcome.inbound_digest = inbound_digest(step_request_digest(request), traffic.inbound);
  outcome.outbound_digest = outbound_digest(traffic.outbound);
  outcome.leaf = step_leaf(outcome.step, outcome.state_hash, outcome.inbound_digest, outcome.outbound_digest);
  outcome.outbound = std::move(traffic.outbound);
  if (cheat_.strategy == S::lie_in_leaf && cheat_acts(request.step())) outcome.leaf[0] ^= 0x5a;
  if (cheat_.strategy == S::random_weights) {
    randombytes_buf(outcome.state_hash.data(), outcome.state_hash.size());
    randombytes_buf(outcome.leaf.data(), outcome.leaf.size());
    reply.set_state_hash(outcome.state_hash.data(), outcome.state_hash.size());
  }
  reply.set_leaf(outcome.leaf.data(), outcome.leaf.size());
  if (record_) {
    solvernet::v1::StepEvidence evidence;
    evidence.set_step(outcome.step);
    *evidence.mutable_request() = request;
    for (auto& message : traffic.inbound_messages) *evidence.add_inbound() = std::move(message);
    evidence.set_state_hash(outcome.state_hash.data(), 32);
    evidence.set_inbound_digest(outcome.inbound_digest.data(), 32);
    evidence.set_outbound_digest(outcome.outbound_digest.data(), 32);
    evidence.set_leaf(outcome.leaf.data(), 32);
    SN_TRY(write_step_evidence(evidence_dir_, evidence));
    SN_TRY(append_file(leaves_path(evidence_dir_),
                       std::string_view(reinterpret_cast<const char*>(outcome.leaf.data()), outcome.leaf.size())));
  }
  last_step_ = std::move(outcome);
  return ok_status();
}

}  // namespace sn::train
