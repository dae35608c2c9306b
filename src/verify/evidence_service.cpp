// The Evidence service: a solver's node serves what it kept of its training
// (DATA/evidence, DATA/checkpoints) to whoever verifies or referees it.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <fstream>
#include <map>
#include <mutex>

#include "core/fs.h"
#include "model/tensor_wire.h"
#include "verify/step_trace.h"
#include "verify/trace_cache.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"
#include "verify/evidence_rpc.h"
#include "train/evidence.h"
#include "verify/verify.h"

namespace sn::verify {
namespace {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;

grpc::Status refuse(ErrorKind kind, const std::string& message) { return net::to_grpc(Error{message, 1, kind}); }

class EvidenceServiceImpl final : public pb::Evidence::Service {
 public:
  explicit EvidenceServiceImpl(EvidenceServiceOptions options) : options_(std::move(options)) {}

  grpc::Status GetCommitment(grpc::ServerContext*, const pb::GetCommitmentRequest* request,
                             pb::GetCommitmentReply* reply) override {
    auto dir = admit("Evidence.GetCommitment", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    auto leaves = train::read_leaves(*dir);
    if (!leaves.ok()) return net::to_grpc(leaves.error());
    std::string bytes;
    for (const auto& leaf : *leaves) bytes.append(reinterpret_cast<const char*>(leaf.data()), leaf.size());
    const Hash256 root = commitment_root(*leaves);
    reply->set_leaves(std::move(bytes));
    reply->set_root(root.data(), root.size());
    reply->set_leaf_count(static_cast<int64_t>(leaves->size()));
    reply->set_chain_address(options_.chain_address);
    return grpc::Status::OK;
  }

  grpc::Status GetSetup(grpc::ServerContext*, const pb::GetSetupRequest* request, pb::GetSetupReply* reply) override {
    auto dir = admit("Evidence.GetSetup", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    auto setup = read_existing(*dir / "setup.pb");
    if (!setup.ok()) return net::to_grpc(setup.error());
    reply->set_setup(std::move(setup).value());
    return grpc::Status::OK;
  }

  grpc::Status GetStepEvidence(grpc::ServerContext*, const pb::GetStepEvidenceRequest* request,
                               pb::GetStepEvidenceReply* reply) override {
    auto dir = admit("Evidence.GetStepEvidence", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    if (options_.withhold) return withheld("step evidence");
    if (request->step() < 1) return refuse(ErrorKind::invalid_input, fmt::format("step {} < 1 (steps are 1-based)", request->step()));
    auto evidence = read_existing(train::step_evidence_path(*dir, request->step()));
    if (!evidence.ok()) return net::to_grpc(evidence.error());
    reply->set_evidence(std::move(evidence).value());
    return grpc::Status::OK;
  }

  grpc::Status GetCheckpoint(grpc::ServerContext*, const pb::GetCheckpointRequest* request,
                             pb::GetCheckpointReply* reply) override {
    auto dir = admit("Evidence.GetCheckpoint", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    if (options_.withhold) return withheld("checkpoints");
    if (request->offset() < 0 || request->max_bytes() < 0 || request->max_bytes() > kMaxChunkBytes)
      return refuse(ErrorKind::invalid_input,
                    fmt::format("offset must be ≥ 0 and max_bytes in 0..{}", kMaxChunkBytes));
    const auto& m = request->member();
    const fs::path ckpt = train::checkpoint_dir(options_.data_dir, m.job_id(), m.stage(), m.replica());
    const std::string manifest_name = fmt::format("step-{:012d}.manifest.json", request->step());
    auto manifest = read_existing(ckpt / manifest_name);
    if (!manifest.ok()) return net::to_grpc(manifest.error());
    std::vector<std::string> names = {manifest_name};
    try {
      const nlohmann::json parsed = nlohmann::json::parse(*manifest);
      for (const auto& file : parsed.at("files")) names.push_back(file.at("name").get<std::string>());
    } catch (const std::exception& e) {
      return refuse(ErrorKind::internal, fmt::format("{}: unreadable manifest ({})", manifest_name, e.what()));
    }
    for (const auto& name : names) {
      // Names in a manifest are plain names in its directory (docs/checkpoints.md).
      if (name.find('/') != std::string::npos || name == ".." || name == ".")
        return refuse(ErrorKind::internal, fmt::format("{}: file name \"{}\" is not a plain name", manifest_name, name));
      std::error_code error;
      const auto size = fs::file_size(ckpt / name, error);
      if (error) return refuse(ErrorKind::not_found, fmt::format("checkpoint {} lacks {}", request->step(), name));
      auto* file = reply->add_files();
      file->set_name(name);
      file->set_bytes(static_cast<int64_t>(size));
    }
    if (request->file().empty()) return grpc::Status::OK;
    if (std::find(names.begin(), names.end(), request->file()) == names.end())
      return refuse(ErrorKind::not_found, fmt::format("checkpoint {} has no file \"{}\"", request->step(), request->file()));
    std::ifstream in(ckpt / request->file(), std::ios::binary);
    in.seekg(0, std::ios::end);
    const int64_t total = static_cast<int64_t>(in.tellg());
    if (request->offset() > total)
      return refuse(ErrorKind::invalid_input, fmt::format("offset {} is past the end of {} ({} bytes)", request->offset(), request->file(), total));
    const int64_t count = std::min(request->max_bytes() > 0 ? request->max_bytes() : kMaxChunkBytes, total - request->offset());
    std::string data(static_cast<size_t>(count), '\0');
    in.seekg(request->offset());
    in.read(data.data(), count);
    if (!in) return refuse(ErrorKind::internal, fmt::format("reading {}", request->file()));
    reply->set_data(std::move(data));
    reply->set_total_bytes(total);
    return grpc::Status::OK;
  }

  grpc::Status GetOpTrace(grpc::ServerContext*, const pb::GetOpTraceRequest* request,
                          pb::GetOpTraceReply* reply) override {
    auto dir = admit("Evidence.GetOpTrace", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    auto trace = traced(*request);
    if (!trace.ok()) return net::to_grpc(trace.error());
    for (const auto& record : (*trace)->records) *reply->add_records() = record_to_proto(record);
    const Hash256& root = (*trace)->root();
    reply->set_root(root.data(), root.size());
    return grpc::Status::OK;
  }

  grpc::Status GetTensor(grpc::ServerContext*, const pb::GetTensorRequest* request, pb::Tensor* reply) override {
    auto dir = admit("Evidence.GetTensor", *request);
    if (!dir.ok()) return net::to_grpc(dir.error());
    if (options_.withhold) return withheld("tensors");
    if (request->hash().size() != 32) return refuse(ErrorKind::invalid_input, "a tensor hash has 32 bytes");
    auto trace = traced(*request);
    if (!trace.ok()) return net::to_grpc(trace.error());
    Hash256 hash;
    std::copy(request->hash().begin(), request->hash().end(), hash.begin());
    auto it = (*trace)->tensors.find(hash);
    if (it == (*trace)->tensors.end())
      return refuse(ErrorKind::not_found, fmt::format("step {}'s trace holds no tensor {}", request->step(), to_hex(hash)));
    model::tensor_to_proto(it->second, reply);
    return grpc::Status::OK;
  }

 private:
  // The signature, the time, the rate, and the member's evidence directory.
  template <class Request>
  Result<fs::path> admit(const char* method, const Request& request) {
    const auto& auth = request.auth();
    if (auth.client_public_key().size() != 32 || auth.signature().size() != 64)
      return kind_error(ErrorKind::permission_denied, "{}: unsigned request", method);
    PublicKey key;
    std::copy(auth.client_public_key().begin(), auth.client_public_key().end(), key.begin());
    const Hash256 digest = evidence_digest(method, request);
    if (!verify_signature(key, digest, as_bytes(auth.signature())))
      return kind_error(ErrorKind::permission_denied, "{}: bad signature", method);
    const int64_t skew = net::unix_ms_now() - auth.time_ms();
    if (skew > options_.control_window.count() || -skew > options_.control_window.count())
      return kind_error(ErrorKind::permission_denied, "{}: signed {} ms away from this node's clock (limit {} ms)",
                        method, skew, options_.control_window.count());
    if (!take_token(key))
      return kind_error(ErrorKind::resource_exhausted, "{}: more than {} requests/s from one key", method,
                        options_.requests_per_second);
    const auto& m = request.member();
    SN_TRY(check_job_id(m.job_id()));
    if (m.stage() < 0 || m.replica() < 0 || m.stage() > 4096 || m.replica() > 4096)
      return input_error("stage {} replica {} out of range", m.stage(), m.replica());
    fs::path dir = train::evidence_dir(options_.data_dir, m.job_id(), m.stage(), m.replica());
    std::error_code error;
    if (!fs::is_directory(dir, error))
      return kind_error(ErrorKind::not_found, "this node holds no evidence of job {} stage {} replica {}", m.job_id(),
                        m.stage(), m.replica());
    return dir;
  }

  template <class Request>
  Result<std::shared_ptr<const train::Trace>> traced(const Request& request) {
    if (!options_.traces) return kind_error(ErrorKind::unavailable, "this node does not serve operation traces");
    const auto& m = request.member();
    return options_.traces->get({m.job_id(), m.stage(), m.replica()}, request.step());
  }

  bool take_token(const PublicKey& key) {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mutex_);
    if (buckets_.size() > 10000) buckets_.clear();  // bounded: a flood of fresh keys resets the table
    auto [it, fresh] = buckets_.try_emplace(key, Bucket{options_.burst, now});
    Bucket& b = it->second;
    const double elapsed = std::chrono::duration<double>(now - b.last).count();
    b.tokens = std::min(options_.burst, b.tokens + elapsed * options_.requests_per_second);
    b.last = now;
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  static Result<std::string> read_existing(const fs::path& file) {
    std::error_code error;
    if (!fs::exists(file, error)) return kind_error(ErrorKind::not_found, "this node has no {}", file.filename().string());
    return read_file(file);
  }

  grpc::Status withheld(const std::string& what) {
    spdlog::warn("CHEAT withhold: refusing to serve {}", what);
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "withheld");
  }

  struct Bucket {
    double tokens;
    std::chrono::steady_clock::time_point last;
  };
  EvidenceServiceOptions options_;
  std::mutex mutex_;
  std::map<PublicKey, Bucket> buckets_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_evidence_service(EvidenceServiceOptions options) {
  return std::make_unique<EvidenceServiceImpl>(std::move(options));
}

}  // namespace sn::verify
