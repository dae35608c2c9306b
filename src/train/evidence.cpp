#include "train/evidence.h"

#include <fmt/format.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "core/fs.h"
#include "core/merkle.h"
#include "train/hashing.h"

namespace sn::train {
namespace {

using hashing::put_string;

template <class Message>
Result<Message> read_message(const std::filesystem::path& path, std::string_view what) {
  if (!std::filesystem::exists(path)) return kind_error(ErrorKind::not_found, "no {} at {}", what, path.string());
  SN_ASSIGN(std::string data, read_file(path));
  Message message;
  if (!message.ParseFromString(data)) return make_error("{} {} does not parse (truncated or altered)", what, path.string());
  return message;
}

}  // namespace

std::filesystem::path evidence_dir(const std::filesystem::path& data_dir, std::string_view job_id, int stage,
                                   int replica) {
  return data_dir / "evidence" / std::string(job_id) / fmt::format("stage{}-replica{}", stage, replica);
}

std::filesystem::path checkpoint_dir(const std::filesystem::path& data_dir, std::string_view job_id, int stage,
                                     int replica) {
  return data_dir / "checkpoints" / std::string(job_id) / fmt::format("stage{}-replica{}", stage, replica);
}

std::filesystem::path setup_evidence_path(const std::filesystem::path& dir) { return dir / "setup.pb"; }

std::filesystem::path step_evidence_path(const std::filesystem::path& dir, int64_t step) {
  return dir / fmt::format("step-{:012d}.pb", step);
}

std::filesystem::path leaves_path(const std::filesystem::path& dir) { return dir / "leaves.bin"; }

Hash256 step_request_digest(const solvernet::v1::RunStepRequest& request) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    request.SerializeToCodedStream(&coded);
  }
  Hasher h;
  put_string(h, "solvernet/step-request/v1");
  h.update(bytes);
  return h.finish();
}

Hash256 inbound_digest(const Hash256& request_digest, std::vector<TaggedDigest> messages) {
  std::sort(messages.begin(), messages.end(), [](const auto& a, const auto& b) { return a.tag < b.tag; });
  Hasher h;
  put_string(h, "solvernet/inbound/v1");
  h.update(request_digest);
  h.update_u64(messages.size());
  for (const auto& m : messages) h.update(m.digest);
  return h.finish();
}

Hash256 outbound_digest(std::vector<OutboundDigest> messages) {
  std::sort(messages.begin(), messages.end());
  Hasher h;
  put_string(h, "solvernet/outbound/v1");
  h.update_u64(messages.size());
  for (const auto& m : messages) {
    h.update_u64(static_cast<uint64_t>(m.to));
    h.update(m.digest);
  }
  return h.finish();
}

Hash256 step_leaf(int64_t t, const Hash256& state, const Hash256& inbound, const Hash256& outbound) {
  Hasher h;
  put_string(h, "solvernet/leaf/v2");
  h.update_u64(static_cast<uint64_t>(t));
  h.update(state);
  h.update(inbound);
  h.update(outbound);
  return h.finish();
}

Hash256 leaves_root(const std::vector<Hash256>& leaves) {
  std::vector<Hash256> nodes;
  nodes.reserve(leaves.size());
  for (const auto& leaf : leaves) nodes.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
  return merkle_root(nodes, MerkleHash::keccak256);
}

Status write_step_evidence(const std::filesystem::path& dir, const solvernet::v1::StepEvidence& evidence) {
  const auto path = step_evidence_path(dir, evidence.step());
  const auto temp = std::filesystem::path(path.string() + ".tmp");
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out || !evidence.SerializeToOstream(&out) || !out.flush())
      return make_error("cannot write {}: {}", temp.string(), std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(temp, path, ec);
  if (ec) return make_error("cannot rename {} to {}: {}", temp.string(), path.string(), ec.message());
  return ok_status();
}

Result<solvernet::v1::SetupJobRequest> read_setup_evidence(const std::filesystem::path& dir) {
  return read_message<solvernet::v1::SetupJobRequest>(setup_evidence_path(dir), "setup evidence");
}

Result<solvernet::v1::StepEvidence> read_step_evidence(const std::filesystem::path& dir, int64_t step) {
  SN_ASSIGN(auto evidence, read_message<solvernet::v1::StepEvidence>(step_evidence_path(dir, step), "step evidence"));
  if (evidence.step() != step)
    return make_error("step evidence {} says step {}", step_evidence_path(dir, step).string(), evidence.step());
  return evidence;
}

Result<std::vector<Hash256>> read_leaves(const std::filesystem::path& dir) {
  const auto path = leaves_path(dir);
  if (!std::filesystem::exists(path)) return kind_error(ErrorKind::not_found, "no leaves at {}", path.string());
  SN_ASSIGN(std::string data, read_file(path));
  if (data.size() % 32 != 0)
    return make_error("{} holds {} bytes, not a multiple of 32 (truncated)", path.string(), data.size());
  std::vector<Hash256> leaves(data.size() / 32);
  for (size_t i = 0; i < leaves.size(); ++i) std::memcpy(leaves[i].data(), data.data() + 32 * i, 32);
  return leaves;
}

}  // namespace sn::train
