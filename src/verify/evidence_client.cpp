#include <fstream>

#include "core/fs.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"
#include "verify/evidence_rpc.h"
#include "verify/verify.h"

namespace sn::verify {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;

struct EvidenceClient::Impl {
  std::string node_id;
  std::unique_ptr<pb::Evidence::Stub> stub;
  net::ControlSigner signer;
  std::chrono::milliseconds deadline;

  Impl(const std::string& address, const std::string& id, const NodeKey& key, std::chrono::milliseconds d)
      : node_id(id), stub(pb::Evidence::NewStub(net::make_channel(address, id, &key))), signer(key), deadline(d) {}

  template <class Request, class Reply, class Call>
  Result<Reply> call(const char* method, Request& request, Call rpc) {
    sign_evidence(signer, method, request);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + deadline);
    Reply reply;
    grpc::Status status = (stub.get()->*rpc)(&context, request, &reply);
    if (!status.ok()) return net::from_grpc(status, fmt::format("{} from node {}", method, node_id.substr(0, 8)));
    return reply;
  }
};

namespace {
pb::EvidenceMember to_proto(const Member& m) {
  pb::EvidenceMember out;
  out.set_job_id(m.job_id);
  out.set_stage(m.stage);
  out.set_replica(m.replica);
  return out;
}
}  // namespace

EvidenceClient::EvidenceClient(const std::string& address, const std::string& node_id, const NodeKey& key,
                               std::chrono::milliseconds deadline)
    : impl_(std::make_unique<Impl>(address, node_id, key, deadline)) {}
EvidenceClient::~EvidenceClient() = default;

Result<Commitment> EvidenceClient::commitment(const Member& member) {
  pb::GetCommitmentRequest request;
  *request.mutable_member() = to_proto(member);
  SN_ASSIGN(auto reply, (impl_->call<pb::GetCommitmentRequest, pb::GetCommitmentReply>(
                            "Evidence.GetCommitment", request, &pb::Evidence::Stub::GetCommitment)));
  const std::string who = fmt::format("node {}", impl_->node_id.substr(0, 8));
  if (reply.leaves().size() % 32 != 0 || static_cast<int64_t>(reply.leaves().size() / 32) != reply.leaf_count())
    return kind_error(ErrorKind::bad_peer, "{} sent {} bytes of leaves for a count of {}", who, reply.leaves().size(),
                      reply.leaf_count());
  Commitment out;
  out.leaves = split_leaves(reply.leaves());
  out.root = commitment_root(out.leaves);
  out.chain_address = reply.chain_address();
  if (reply.root() != std::string(reinterpret_cast<const char*>(out.root.data()), out.root.size()))
    return kind_error(ErrorKind::bad_peer, "{} sent a root that is not the root of its leaves", who);
  return out;
}

Result<pb::SetupJobRequest> EvidenceClient::setup(const Member& member) {
  pb::GetSetupRequest request;
  *request.mutable_member() = to_proto(member);
  SN_ASSIGN(auto reply, (impl_->call<pb::GetSetupRequest, pb::GetSetupReply>("Evidence.GetSetup", request,
                                                                             &pb::Evidence::Stub::GetSetup)));
  pb::SetupJobRequest setup;
  if (!setup.ParseFromString(reply.setup()))
    return kind_error(ErrorKind::bad_peer, "node {} sent a setup that does not parse", impl_->node_id.substr(0, 8));
  return setup;
}

Result<std::string> EvidenceClient::step_evidence(const Member& member, int64_t step) {
  pb::GetStepEvidenceRequest request;
  *request.mutable_member() = to_proto(member);
  request.set_step(step);
  SN_ASSIGN(auto reply, (impl_->call<pb::GetStepEvidenceRequest, pb::GetStepEvidenceReply>(
                            "Evidence.GetStepEvidence", request, &pb::Evidence::Stub::GetStepEvidence)));
  return std::move(*reply.mutable_evidence());
}

Result<fs::path> EvidenceClient::fetch_checkpoint(const Member& member, int64_t step, const fs::path& dest) {
  SN_TRY(ensure_directory(dest));
  pb::GetCheckpointRequest request;
  *request.mutable_member() = to_proto(member);
  request.set_step(step);
  SN_ASSIGN(auto listing, (impl_->call<pb::GetCheckpointRequest, pb::GetCheckpointReply>(
                              "Evidence.GetCheckpoint", request, &pb::Evidence::Stub::GetCheckpoint)));
  const std::string who = fmt::format("node {}", impl_->node_id.substr(0, 8));
  for (const auto& file : listing.files()) {
    if (file.name().empty() || file.name().find('/') != std::string::npos || file.name() == "..")
      return kind_error(ErrorKind::bad_peer, "{} named a checkpoint file \"{}\"", who, file.name());
    std::ofstream out(dest / file.name(), std::ios::binary | std::ios::trunc);
    int64_t offset = 0;
    while (offset < file.bytes()) {
      request.set_file(file.name());
      request.set_offset(offset);
      request.set_max_bytes(kMaxChunkBytes);
      SN_ASSIGN(auto chunk, (impl_->call<pb::GetCheckpointRequest, pb::GetCheckpointReply>(
                                "Evidence.GetCheckpoint", request, &pb::Evidence::Stub::GetCheckpoint)));
      if (chunk.total_bytes() != file.bytes() || chunk.data().empty())
        return kind_error(ErrorKind::bad_peer, "{}: checkpoint file {} changed size or came back empty", who, file.name());
      out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size()));
      offset += static_cast<int64_t>(chunk.data().size());
    }
    if (!out) return make_error("writing {}", (dest / file.name()).string());
  }
  return dest;
}

Result<pb::GetOpTraceReply> EvidenceClient::op_trace(const Member& member, int64_t step) {
  pb::GetOpTraceRequest request;
  *request.mutable_member() = to_proto(member);
  request.set_step(step);
  return impl_->call<pb::GetOpTraceRequest, pb::GetOpTraceReply>("Evidence.GetOpTrace", request,
                                                                 &pb::Evidence::Stub::GetOpTrace);
}

Result<pb::Tensor> EvidenceClient::tensor(const Member& member, int64_t step, const Hash256& hash) {
  pb::GetTensorRequest request;
  *request.mutable_member() = to_proto(member);
  request.set_step(step);
  request.set_hash(hash.data(), hash.size());
  return impl_->call<pb::GetTensorRequest, pb::Tensor>("Evidence.GetTensor", request, &pb::Evidence::Stub::GetTensor);
}

}  // namespace sn::verify
