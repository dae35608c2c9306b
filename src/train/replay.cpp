#include "train/replay.h"

#include <cstdlib>
#include <cstring>

#include "core/fs.h"
#include "core/keys.h"
#include "train/control.h"
#include "train/step_transport.h"

namespace sn::train {

struct ReplaySession::Impl {
  solvernet::v1::SetupJobRequest setup;
  PublicKey owner{};
  std::shared_ptr<ReplayTransport> transport;
  std::filesystem::path temp_dir;  // removed at the end (when we made it)
  ~Impl() {
    std::error_code ec;
    if (!temp_dir.empty()) std::filesystem::remove_all(temp_dir, ec);
  }
};

namespace {

bool signed_by(const PublicKey& key, const Hash256& digest, const std::string& signature) {
  return verify_signature(key, digest,
                          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(signature.data()), signature.size()));
}

// The request's auth must name KEY and carry its signature over the request.
template <class Request>
bool owner_signed(const PublicKey& key, const char* method, const Request& request) {
  const auto& auth = request.auth();
  if (auth.client_public_key().size() != key.size() ||
      std::memcmp(auth.client_public_key().data(), key.data(), key.size()) != 0)
    return false;
  return signed_by(key, request_digest(method, request), auth.signature());
}

}  // namespace

ReplaySession::~ReplaySession() {
  // The worker's codecs hold files in the scratch dir: close them first.
  worker_.reset();
  impl_.reset();
}

Result<std::unique_ptr<ReplaySession>> ReplaySession::open(const ReplayInputs& inputs) {
  std::unique_ptr<ReplaySession> session(new ReplaySession());
  session->impl_ = std::make_unique<Impl>();
  auto& impl = *session->impl_;
  impl.setup = inputs.setup;
  const auto& setup = impl.setup;
  if (setup.auth().client_public_key().size() != impl.owner.size())
    return kind_error(ErrorKind::bad_peer, "the setup of job {} carries no owner key", setup.job_id());
  std::memcpy(impl.owner.data(), setup.auth().client_public_key().data(), impl.owner.size());
  if (!owner_signed(impl.owner, "SetupJob", setup))
    return kind_error(ErrorKind::bad_peer, "the setup of job {} is not signed by its owner", setup.job_id());

  std::vector<net::MemberInfo> members;
  for (const auto& m : setup.members()) {
    net::MemberInfo info;
    info.node_id = m.node_id();
    if (m.public_key().size() != 32)
      return kind_error(ErrorKind::bad_peer, "setup member {} has a public key of {} bytes", members.size(),
                        m.public_key().size());
    std::memcpy(info.public_key.data(), m.public_key().data(), 32);
    info.stage = m.stage();
    info.replica = m.replica();
    members.push_back(std::move(info));
  }
  SN_ASSIGN(auto job, parse_job_string(setup.job_toml(), "job of the setup"));
  const int self = static_cast<int>(setup.stage() * job.parallel.replicas + setup.replica());
  if (self < 0 || self >= static_cast<int>(members.size()))
    return kind_error(ErrorKind::invalid_input, "the setup's role stage {} replica {} is not among its members",
                      setup.stage(), setup.replica());
  impl.transport = std::make_shared<ReplayTransport>(std::move(members), self);

  std::filesystem::path scratch = inputs.scratch_dir;
  if (scratch.empty()) {
    std::string pattern = (std::filesystem::temp_directory_path() / "solvernet-replay-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) return make_error("cannot make a scratch directory: {}", std::strerror(errno));
    impl.temp_dir = scratch = pattern;
  }
  SN_ASSIGN(session->worker_, StageWorker::create_offline(setup, impl.transport, inputs.checkpoint_dir,
                                                          inputs.checkpoint_step, scratch, inputs.cheat));
  return session;
}

Result<ReplayedStep> ReplaySession::run_step(const solvernet::v1::StepEvidence& evidence) {
  const auto& request = evidence.request();
  const int64_t next = worker_->steps_done() + 1;
  if (evidence.step() != next || request.step() != next - 1)
    return kind_error(ErrorKind::invalid_input, "evidence of step {} (request step {}), but the replay is at step {}",
                      evidence.step(), request.step() + 1, next);
  if (request.job_id() != impl_->setup.job_id())
    return kind_error(ErrorKind::bad_peer, "step {}: the request is for job {}, not {}", next, request.job_id(),
                      impl_->setup.job_id());
  if (request.forward_only())
    return kind_error(ErrorKind::bad_peer, "step {}: the request is an evaluation, not a training step", next);
  if (!owner_signed(impl_->owner, "RunStep", request))
    return kind_error(ErrorKind::bad_peer, "step {}: the step request is not signed by the job's owner (forged or altered)",
                      next);
  SN_TRY(impl_->transport->load_step(impl_->setup.job_id(), evidence));
  SN_TRY(worker_->run_step(request));
  const StepOutcome& outcome = worker_->last_step();
  ReplayedStep out;
  out.step = outcome.step;
  out.state_hash = outcome.state_hash;
  out.inbound_digest = outcome.inbound_digest;
  out.outbound_digest = outcome.outbound_digest;
  out.leaf = outcome.leaf;
  out.outbound = outcome.outbound;
  return out;
}

int64_t ReplaySession::steps_done() const { return worker_->steps_done(); }

Hash256 ReplaySession::state_hash() const { return worker_->state_hash(); }

Result<ReplayResult> replay_member(const ReplayInputs& inputs) {
  SN_ASSIGN(auto session, ReplaySession::open(inputs));
  ReplayResult result;
  result.start_state = session->state_hash();
  for (const auto& evidence : inputs.steps) {
    SN_ASSIGN(auto step, session->run_step(evidence));
    result.steps.push_back(std::move(step));
  }
  return result;
}

}  // namespace sn::train
