// SolverMarket calls, deployment and the local anvil dev chain.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "chain/chain.h"
#include "core/fs.h"
#include "core/process.h"

namespace sn::chain {

namespace {
Hash256 word_of(uint64_t value) {
  Hash256 word{};
  for (int i = 31; i >= 24; --i, value >>= 8) word[i] = static_cast<uint8_t>(value & 0xff);
  return word;
}

Wei word_to_uint(std::span<const uint8_t> word) {
  Wei out = 0;
  for (size_t i = 16; i < 32 && i < word.size(); ++i) out = (out << 8) | word[i];
  return out;
}

uint64_t uint_at(const Bytes& out, size_t index) {
  return static_cast<uint64_t>(word_to_uint(std::span<const uint8_t>(out).subspan(index * 32, 32)));
}

Hash256 word_at(const Bytes& out, size_t index) {
  Hash256 word;
  std::copy(out.begin() + index * 32, out.begin() + (index + 1) * 32, word.begin());
  return word;
}

Address address_at(const Bytes& out, size_t index) {
  Address address;
  std::copy(out.begin() + index * 32 + 12, out.begin() + (index + 1) * 32, address.begin());
  return address;
}

std::string to_quantity(Wei value) {
  uint64_t high = static_cast<uint64_t>(value >> 64), low = static_cast<uint64_t>(value);
  return high ? fmt::format("0x{:x}{:016x}", high, low) : fmt::format("0x{:x}", low);
}
}  // namespace

// ------------------------------------------------------------------ deployment

nlohmann::json Deployment::to_json() const {
  return {{"chain_id", chain_id},       {"rpc_url", rpc_url},
          {"market", address_hex(market)}, {"deploy_block", deploy_block},
          {"abi_hash", abi_hash},       {"unbonding_blocks", unbonding_blocks},
          {"turn_blocks", turn_blocks}};
}

Result<Deployment> Deployment::from_json(const nlohmann::json& json) {
  if (!json.is_object() || !json.contains("market") || !json["market"].is_string() ||
      !json.contains("chain_id") || !json["chain_id"].is_number_unsigned())
    return input_error("deployment JSON needs \"market\" (address) and \"chain_id\"");
  Deployment deployment;
  deployment.chain_id = json["chain_id"].get<uint64_t>();
  SN_ASSIGN(deployment.market, parse_address(json["market"].get<std::string>()));
  deployment.rpc_url = json.value("rpc_url", "");
  deployment.deploy_block = json.value("deploy_block", uint64_t{0});
  deployment.abi_hash = json.value("abi_hash", "");
  deployment.unbonding_blocks = json.value("unbonding_blocks", uint64_t{0});
  deployment.turn_blocks = json.value("turn_blocks", uint64_t{0});
  return deployment;
}

Result<Deployment> Deployment::load(const std::filesystem::path& path) {
  SN_ASSIGN(std::string text, read_file(path));
  auto json = nlohmann::json::parse(text, nullptr, false);
  if (json.is_discarded()) return input_error("{}: not JSON", path.string());
  auto deployment = from_json(json);
  if (!deployment.ok()) return input_error("{}: {}", path.string(), deployment.message());
  return deployment;
}

Status Deployment::save(const std::filesystem::path& path) const {
  return write_file_atomic(path, to_json().dump(2) + "\n");
}

std::filesystem::path default_contracts_dir() {
  if (const char* source = std::getenv("SOLVERNET_SOURCE_DIR")) return std::filesystem::path(source) / "contracts";
  return std::filesystem::path(SOLVERNET_CHAIN_SOURCE_DIR) / "contracts";
}

std::filesystem::path foundry_tool(const std::string& name, const std::filesystem::path& contracts_dir) {
  // The npm package's native binary, run directly: its Node.js wrapper
  // (node_modules/.bin) would be a second process that a parent's death does
  // not reach, leaving the real tool running.
#if defined(__x86_64__)
  const char* arch = "amd64";
#elif defined(__aarch64__)
  const char* arch = "arm64";
#else
  const char* arch = "";
#endif
  auto native = contracts_dir / "node_modules" / "@foundry-rs" / (name + "-linux-" + arch) / "bin" / name;
  if (*arch && std::filesystem::exists(native)) return native;
  auto local = contracts_dir / "node_modules" / ".bin" / name;
  if (std::filesystem::exists(local)) return local;
  return name;  // from PATH
}

static Result<nlohmann::json> load_artifact(const std::filesystem::path& contracts_dir) {
  auto artifact = contracts_dir / "out" / "SolverMarket.sol" / "SolverMarket.json";
  // Processes started together (tests under ctest -j) would otherwise build at once and
  // read each other's half-written artifact: check, build and read under one flock.
  // (A read-only contracts folder has a built artifact; then no lock is taken.)
  std::error_code mkdir_error;
  std::filesystem::create_directories(contracts_dir / "cache", mkdir_error);
  int lock_fd = ::open((contracts_dir / "cache" / "solvernet-deploy.lock").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
  if (lock_fd >= 0) ::flock(lock_fd, LOCK_EX);
  struct Unlock {
    int fd;
    ~Unlock() {
      if (fd >= 0) ::close(fd);  // closing releases the flock
    }
  } unlock{lock_fd};
  // Rebuilt when missing or older than the source: a checkout that changed the contract
  // must not deploy the previous one (whose calls would then revert without a reason).
  std::error_code ec;
  auto source = contracts_dir / "src" / "SolverMarket.sol";
  bool stale = !std::filesystem::exists(artifact) ||
               (std::filesystem::exists(source) &&
                std::filesystem::last_write_time(source, ec) > std::filesystem::last_write_time(artifact, ec));
  if (stale) {
    // forge builds offline with the solc-js front; run it in the contracts folder.
    auto forge = foundry_tool("forge", contracts_dir);
    auto built = run_command({"/bin/sh", "-c",
                              "cd '" + contracts_dir.string() + "' && PATH='" +
                                  (contracts_dir / "node_modules" / ".bin").string() + "':\"$PATH\" '" +
                                  forge.string() + "' build --quiet"});
    if (!built.ok()) return make_error("forge build in {} failed: {}", contracts_dir.string(), built.message());
  }
  SN_ASSIGN(std::string text, read_file(artifact));
  auto json = nlohmann::json::parse(text, nullptr, false);
  if (json.is_discarded() || !json.contains("bytecode")) return make_error("{}: not a forge artifact", artifact.string());
  return json;
}

Result<Deployment> deploy_market(std::shared_ptr<const RpcClient> rpc, const Key& deployer,
                                 const DeployOptions& options) {
  auto contracts_dir = options.contracts_dir.empty() ? default_contracts_dir() : options.contracts_dir;
  SN_ASSIGN(auto artifact, load_artifact(contracts_dir));
  const auto& object = artifact["bytecode"]["object"];
  if (!object.is_string()) return make_error("artifact has no bytecode");
  SN_ASSIGN(Bytes code, parse_hex0x(object.get<std::string>()));
  abi::put_uint(code, options.unbonding_blocks);
  abi::put_uint(code, options.turn_blocks);
  SN_ASSIGN(uint64_t chain_id, rpc->chain_id());
  Wallet wallet(rpc, deployer, chain_id);
  SN_ASSIGN(Receipt receipt, wallet.send(std::nullopt, 0, code));
  if (!receipt.contract_address) return make_error("deployment receipt has no contract address");
  Deployment deployment;
  deployment.chain_id = chain_id;
  deployment.rpc_url = rpc->url();
  deployment.market = *receipt.contract_address;
  deployment.deploy_block = receipt.block;
  deployment.abi_hash = hex0x(keccak256(as_bytes(artifact["abi"].dump())));
  deployment.unbonding_blocks = options.unbonding_blocks;
  deployment.turn_blocks = options.turn_blocks;
  return deployment;
}

Result<Deployment> find_dev_deployment(std::shared_ptr<const RpcClient> rpc) {
  const Address deployer = anvil_funded_key().address();
  Bytes sender(deployer.begin(), deployer.end());
  Hash256 digest = keccak256(rlp::encode_list({rlp::encode_bytes(sender), rlp::encode_uint(0)}));
  Deployment deployment;
  std::copy(digest.begin() + 12, digest.end(), deployment.market.begin());
  SN_ASSIGN(deployment.chain_id, rpc->chain_id());
  deployment.rpc_url = rpc->url();
  auto view = [&](std::string_view signature) -> Result<uint64_t> {
    SN_ASSIGN(auto json, rpc->call("eth_call", {{{"to", address_hex(deployment.market)},
                                                  {"data", hex0x(abi::selector(signature))}}, "latest"}));
    auto out = json.is_string() ? parse_hex0x(json.get<std::string>()) : Result<Bytes>(make_error("not hex"));
    if (!out.ok() || out->size() != 32)
      return make_error("no SolverMarket at {} on {} (the first contract of anvil's funded account); pass --deployment",
                        address_hex(deployment.market), rpc->url());
    return static_cast<uint64_t>(word_to_uint(*out));
  };
  SN_ASSIGN(deployment.unbonding_blocks, view("unbondingBlocks()"));
  SN_ASSIGN(deployment.turn_blocks, view("turnBlocks()"));
  return deployment;
}

// ------------------------------------------------------------------ market

MarketClient::MarketClient(std::shared_ptr<const RpcClient> rpc, Deployment deployment, Key key,
                           std::filesystem::path journal)
    : rpc_(rpc),
      deployment_(std::move(deployment)),
      wallet_(rpc, std::move(key), deployment_.chain_id, std::move(journal)) {}

Result<MarketClient> MarketClient::for_data_dir(std::shared_ptr<const RpcClient> rpc, Deployment deployment,
                                                const std::filesystem::path& data_dir) {
  SN_ASSIGN(Key key, Key::load_or_create(data_dir / "chain.key"));
  return MarketClient(std::move(rpc), std::move(deployment), std::move(key), data_dir / "chain.journal");
}

Result<Receipt> MarketClient::call_market(std::string_view signature, const Bytes& args, Wei value,
                                          std::string_view action) {
  Bytes data = abi::selector(signature);
  data.insert(data.end(), args.begin(), args.end());
  auto receipt = wallet_.send(deployment_.market, value, data, action);
  if (!receipt.ok()) {
    auto name = signature.substr(0, signature.find('('));
    return make_error("{}: {}", name, receipt.message());
  }
  return receipt;
}

Result<Bytes> MarketClient::view(std::string_view signature, const Bytes& args) const {
  Bytes data = abi::selector(signature);
  data.insert(data.end(), args.begin(), args.end());
  SN_ASSIGN(auto json, rpc_->call("eth_call", {{{"to", address_hex(deployment_.market)}, {"data", hex0x(data)}}, "latest"}));
  if (!json.is_string()) return make_error("RPC answer: eth_call result is not hex");
  SN_ASSIGN(Bytes out, parse_hex0x(json.get<std::string>()));
  if (out.size() < 32) return make_error("{}: answer too short ({} bytes); is the market deployed at {}?",
                                        signature, out.size(), address_hex(deployment_.market));
  return out;
}

Result<Receipt> MarketClient::register_node(const Hash256& node_id, Wei stake, std::string_view action) {
  Bytes args;
  abi::put_bytes32(args, node_id);
  return call_market("register(bytes32)", args, stake, action);
}

Result<Receipt> MarketClient::stake(Wei amount, std::string_view action) {
  return call_market("stake()", {}, amount, action);
}

Result<Receipt> MarketClient::unstake(Wei amount) {
  Bytes args;
  abi::put_uint(args, amount);
  return call_market("unstake(uint128)", args);
}

Result<Receipt> MarketClient::withdraw() { return call_market("withdraw()", {}); }

Result<uint64_t> MarketClient::post_job(const JobTerms& terms, Receipt* receipt_out) {
  // The contract stores the terms packed (docs/contracts.md); out-of-range values would
  // revert without a reason, so they are refused here with one.
  auto fits = [](Wei value, int bits) { return value >> bits == 0; };
  if (!fits(terms.price_per_solver, 96)) return input_error("postJob: price per solver must be < 2^96 wei");
  if (!fits(terms.verifier_fee, 80)) return input_error("postJob: verifier fee must be < 2^80 wei");
  if (!fits(terms.stake_per_role, 88)) return input_error("postJob: stake per role must be < 2^88 wei");
  Bytes args;
  abi::put_uint(args, terms.solver_count);
  abi::put_uint(args, terms.verifier_count);
  abi::put_uint(args, terms.price_per_solver);
  abi::put_uint(args, terms.verifier_fee);
  abi::put_uint(args, terms.stake_per_role);
  abi::put_uint(args, terms.commit_blocks);
  abi::put_uint(args, terms.challenge_window_blocks);
  abi::put_address(args, terms.referee);
  abi::put_bytes32(args, terms.spec);
  SN_ASSIGN(Receipt receipt,
            call_market("postJob(uint16,uint16,uint96,uint80,uint88,uint32,uint32,address,bytes32)", args,
                        terms.escrow()));
  static const Hash256 topic = keccak256(as_bytes("JobPosted(uint256,address,address,bytes32)"));
  for (const auto& log : receipt.logs) {
    if (log.address == deployment_.market && log.topics.size() == 4 && log.topics[0] == topic) {
      if (receipt_out) *receipt_out = receipt;
      return static_cast<uint64_t>(word_to_uint(log.topics[1]));
    }
  }
  return make_error("postJob: receipt has no JobPosted event");
}

Result<Receipt> MarketClient::accept(uint64_t job_id, std::string_view action) {
  Bytes args;
  abi::put_uint(args, job_id);
  return call_market("accept(uint256)", args, 0, action);
}

Result<Receipt> MarketClient::commit(uint64_t job_id, const Hash256& root, uint64_t leaf_count, bool is_final,
                                     std::string_view action) {
  if (leaf_count == 0 || leaf_count >> 48)
    return input_error("commit: leaf count must be in 1 … 2^48 − 1, got {}", leaf_count);
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_bytes32(args, root);
  abi::put_uint(args, leaf_count);
  abi::put_uint(args, is_final ? 1 : 0);
  return call_market("commit(uint256,bytes32,uint48,bool)", args, 0, action);
}

Result<Hash256> MarketClient::verifier_seed(uint64_t job_id) const {
  Bytes args;
  abi::put_uint(args, job_id);
  SN_ASSIGN(Bytes out, view("verifierSeed(uint256)", args));
  return word_at(out, 0);
}

Result<Address> MarketClient::selected_verifier(uint64_t job_id, uint64_t seat) const {
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_uint(args, seat);
  SN_ASSIGN(Bytes out, view("selectedVerifier(uint256,uint256)", args));
  return address_at(out, 0);
}

Result<uint64_t> MarketClient::challenge(uint64_t job_id, const Address& solver, uint64_t lo, const Hash256& lo_leaf,
                                         const std::vector<Hash256>& lo_proof, uint64_t hi, const Hash256& hi_leaf,
                                         const std::vector<Hash256>& hi_proof, Wei bond, Receipt* receipt_out) {
  if (lo >> 48 || hi >> 48) return input_error("challenge: leaf indices must be < 2^48");
  constexpr size_t kHead = 8 * 32;  // the static head; the two proofs follow as tails
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_address(args, solver);
  abi::put_uint(args, lo);
  abi::put_bytes32(args, lo_leaf);
  abi::put_uint(args, kHead);
  abi::put_uint(args, hi);
  abi::put_bytes32(args, hi_leaf);
  abi::put_uint(args, kHead + 32 * (1 + lo_proof.size()));
  abi::put_bytes32_array(args, lo_proof);
  abi::put_bytes32_array(args, hi_proof);
  SN_ASSIGN(Receipt receipt,
            call_market("challenge(uint256,address,uint48,bytes32,bytes32[],uint48,bytes32,bytes32[])", args, bond));
  static const Hash256 topic = keccak256(
      as_bytes("Challenged(uint256,uint256,address,address,uint48,uint48,bytes32,bytes32,uint256,uint32)"));
  for (const auto& log : receipt.logs) {
    if (log.address == deployment_.market && log.topics.size() == 4 && log.topics[0] == topic) {
      if (receipt_out) *receipt_out = receipt;
      return static_cast<uint64_t>(word_to_uint(log.topics[2]));
    }
  }
  return make_error("challenge: receipt has no Challenged event");
}

Result<Receipt> MarketClient::claim_leaf(uint64_t dispute_id, const Hash256& leaf, const std::vector<Hash256>& proof) {
  Bytes args;
  abi::put_uint(args, dispute_id);
  abi::put_bytes32(args, leaf);
  abi::put_uint(args, 3 * 32);
  abi::put_bytes32_array(args, proof);
  return call_market("claimLeaf(uint256,bytes32,bytes32[])", args);
}

Result<Receipt> MarketClient::post_ops(uint64_t dispute_id, uint64_t op_count, const Hash256& r_prev,
                                       const Hash256& state_hash, const Hash256& inbound_digest,
                                       const Hash256& outbound_digest) {
  if (op_count == 0 || op_count >> 48)
    return input_error("postOps: operation count must be in 1 … 2^48 − 1, got {}", op_count);
  Bytes args;
  abi::put_uint(args, dispute_id);
  abi::put_uint(args, op_count);
  abi::put_bytes32(args, r_prev);
  abi::put_bytes32(args, state_hash);
  abi::put_bytes32(args, inbound_digest);
  abi::put_bytes32(args, outbound_digest);
  return call_market("postOps(uint256,uint48,bytes32,bytes32,bytes32,bytes32)", args);
}

Result<Receipt> MarketClient::claim_op(uint64_t dispute_id, const Hash256& r_mid) {
  Bytes args;
  abi::put_uint(args, dispute_id);
  abi::put_bytes32(args, r_mid);
  return call_market("claimOp(uint256,bytes32)", args);
}

Result<Receipt> MarketClient::bisect(uint64_t dispute_id, bool agree) {
  Bytes args;
  abi::put_uint(args, dispute_id);
  abi::put_uint(args, agree ? 1 : 0);
  return call_market("bisect(uint256,bool)", args);
}

Result<Receipt> MarketClient::resolve(uint64_t dispute_id, bool solver_wins) {
  Bytes args;
  abi::put_uint(args, dispute_id);
  abi::put_uint(args, solver_wins ? 1 : 0);
  return call_market("resolve(uint256,bool)", args);
}

Result<Receipt> MarketClient::timeout(uint64_t dispute_id) {
  Bytes args;
  abi::put_uint(args, dispute_id);
  return call_market("timeout(uint256)", args);
}

Result<Receipt> MarketClient::finalize(uint64_t job_id) {
  // Participants come from the job's events; slashed commits are filtered by state.
  auto participants = [&](std::string_view event) -> Result<std::vector<Address>> {
    nlohmann::json filter = {
        {"address", address_hex(deployment_.market)},
        {"fromBlock", to_quantity(deployment_.deploy_block)},
        {"toBlock", "latest"},
        {"topics", {hex0x(keccak256(as_bytes(event))), hex0x(word_of(job_id))}}};
    SN_ASSIGN(auto logs, rpc_->call("eth_getLogs", {filter}));
    if (!logs.is_array()) return make_error("RPC answer: eth_getLogs result is not an array");
    std::vector<Address> out;
    for (const auto& log : logs) {
      if (!log.is_object() || !log.contains("topics") || !log["topics"].is_array() || log["topics"].size() < 3 ||
          !log["topics"][2].is_string())
        return make_error("RPC answer: malformed log");
      SN_ASSIGN(Bytes topic, parse_hex0x(log["topics"][2].get<std::string>()));
      if (topic.size() != 32) return make_error("RPC answer: malformed log topic");
      Address address;
      std::copy(topic.begin() + 12, topic.end(), address.begin());
      if (std::find(out.begin(), out.end(), address) == out.end()) out.push_back(address);
    }
    return out;
  };
  SN_ASSIGN(auto committed, participants("Committed(uint256,address,bytes32,uint48,bool)"));
  SN_ASSIGN(auto verifiers, participants("VerifierAccepted(uint256,address)"));
  std::vector<Address> solvers;
  for (const auto& solver : committed) {
    SN_ASSIGN(Hash256 root, commit_of(job_id, solver));
    if (root != Hash256{}) solvers.push_back(solver);
  }
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_uint(args, 96);
  abi::put_uint(args, 96 + 32 * (1 + solvers.size()));
  abi::put_uint(args, solvers.size());
  for (const auto& solver : solvers) abi::put_address(args, solver);
  abi::put_uint(args, verifiers.size());
  for (const auto& verifier : verifiers) abi::put_address(args, verifier);
  return call_market("finalize(uint256,address[],address[])", args);
}

Result<Wei> MarketClient::stake_of(const Address& node) const {
  Bytes args;
  abi::put_address(args, node);
  SN_ASSIGN(Bytes out, view("stakeOf(address)", args));
  return word_to_uint(std::span<const uint8_t>(out).first(32));
}

Result<Wei> MarketClient::withdrawable_of(const Address& account) const {
  Bytes args;
  abi::put_address(args, account);
  SN_ASSIGN(Bytes out, view("withdrawableOf(address)", args));
  return word_to_uint(std::span<const uint8_t>(out).first(32));
}

Result<bool> MarketClient::is_registered(const Address& node) const {
  Bytes args;
  abi::put_address(args, node);
  SN_ASSIGN(Bytes out, view("nodeIdOf(address)", args));
  return std::any_of(out.begin(), out.begin() + 32, [](uint8_t b) { return b != 0; });
}

Result<Hash256> MarketClient::commit_of(uint64_t job_id, const Address& solver) const {
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_address(args, solver);
  SN_ASSIGN(Bytes out, view("commitOf(uint256,address)", args));
  return word_at(out, 0);
}

Result<bool> MarketClient::is_verifier(uint64_t job_id, const Address& account) const {
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_address(args, account);
  SN_ASSIGN(Bytes out, view("isVerifier(uint256,address)", args));
  return uint_at(out, 0) != 0;
}

Result<CommitState> MarketClient::commit_state(uint64_t job_id, const Address& solver) const {
  CommitState state;
  SN_ASSIGN(state.root, commit_of(job_id, solver));
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_address(args, solver);
  SN_ASSIGN(Bytes out, view("commitInfo(uint256,address)", args));
  if (out.size() < 64) return make_error("commitInfo: answer too short ({} bytes)", out.size());
  state.leaf_count = uint_at(out, 0);
  state.is_final = uint_at(out, 1) != 0;
  return state;
}

Result<JobState> MarketClient::job(uint64_t job_id) const {
  Bytes args;
  abi::put_uint(args, job_id);
  SN_ASSIGN(Bytes out, view("getJob(uint256)", args));
  if (out.size() < 16 * 32) return make_error("getJob: answer too short ({} bytes)", out.size());
  auto wei_at = [&](size_t index) { return word_to_uint(std::span<const uint8_t>(out).subspan(index * 32, 32)); };
  JobState job;
  job.submitter = address_at(out, 0);
  job.referee = address_at(out, 1);
  job.solver_count = static_cast<uint16_t>(uint_at(out, 2));
  job.verifier_count = static_cast<uint16_t>(uint_at(out, 3));
  job.price_per_solver = wei_at(4);
  job.verifier_fee = wei_at(5);
  job.stake_per_role = wei_at(6);
  job.commit_deadline = uint_at(out, 7);
  job.challenge_window = uint_at(out, 8);
  job.last_commit_block = uint_at(out, 9);
  job.committed = static_cast<uint16_t>(uint_at(out, 10));
  job.verifiers_accepted = static_cast<uint16_t>(uint_at(out, 11));
  job.open_disputes = static_cast<uint16_t>(uint_at(out, 12));
  job.finalized = uint_at(out, 13) != 0;
  job.seated = static_cast<uint16_t>(uint_at(out, 14));
  job.all_final = uint_at(out, 15) != 0;
  if (job.solver_count == 0) return kind_error(ErrorKind::not_found, "job {} does not exist", job_id);
  return job;
}

Result<uint64_t> MarketClient::dispute_of(uint64_t job_id, const Address& solver) const {
  Bytes args;
  abi::put_uint(args, job_id);
  abi::put_address(args, solver);
  SN_ASSIGN(Bytes out, view("disputeOf(uint256,address)", args));
  return uint_at(out, 0);
}

Result<DisputeState> MarketClient::dispute(uint64_t dispute_id) const {
  Bytes args;
  abi::put_uint(args, dispute_id);
  SN_ASSIGN(Bytes out, view("getDispute(uint256)", args));
  if (out.size() < 13 * 32) return make_error("getDispute: answer too short ({} bytes)", out.size());
  DisputeState d;
  uint64_t stage = uint_at(out, 0);
  if (stage > static_cast<uint64_t>(DisputeStage::closed)) return make_error("getDispute: unknown stage {}", stage);
  d.stage = static_cast<DisputeStage>(stage);
  if (d.stage == DisputeStage::none) return kind_error(ErrorKind::not_found, "dispute {} does not exist", dispute_id);
  d.phase = phase_of(d.stage);
  d.turn = turn_of(d.stage);
  d.job = uint_at(out, 1);
  d.solver = address_at(out, 2);
  d.challenger = address_at(out, 3);
  d.step = uint_at(out, 4);
  d.lo = uint_at(out, 5);
  d.hi = uint_at(out, 6);
  d.op_count = uint_at(out, 7);
  d.lo_hash = word_at(out, 8);
  d.hi_hash = word_at(out, 9);
  d.mid_hash = word_at(out, 10);
  d.deadline = uint_at(out, 11);
  d.bond = word_to_uint(std::span<const uint8_t>(out).subspan(12 * 32, 32));
  return d;
}

Result<bool> MarketClient::verify_leaf(const Hash256& root, uint64_t count, uint64_t index, const Hash256& leaf,
                                       const std::vector<Hash256>& proof) const {
  Bytes args;
  abi::put_bytes32(args, root);
  abi::put_uint(args, count);
  abi::put_uint(args, index);
  abi::put_bytes32(args, leaf);
  abi::put_uint(args, 5 * 32);
  abi::put_bytes32_array(args, proof);
  SN_ASSIGN(Bytes out, view("verifyLeaf(bytes32,uint256,uint256,bytes32,bytes32[])", args));
  return uint_at(out, 0) != 0;
}

const std::vector<std::string_view>& market_events() {
  static const std::vector<std::string_view> events = {
      "NodeRegistered(address,bytes32)",
      "Staked(address,uint256,uint256)",
      "UnstakeRequested(address,uint256,uint64)",
      "Withdrawn(address,uint256)",
      "JobPosted(uint256,address,address,bytes32)",
      "VerifierAccepted(uint256,address)",
      "Committed(uint256,address,bytes32,uint48,bool)",
      "Challenged(uint256,uint256,address,address,uint48,uint48,bytes32,bytes32,uint256,uint32)",
      "LeafClaimed(uint256,uint48,bytes32,uint32)",
      "OpsPosted(uint256,uint48,uint48,bytes32,bytes32,bytes32,bytes32,bytes32,uint32)",
      "OpClaimed(uint256,uint48,bytes32,uint32)",
      "Bisected(uint256,uint8,uint48,uint48,uint32)",
      "RefereeTurn(uint256,uint48,uint48,bytes32,bytes32,uint32)",
      "DisputeResolved(uint256,address,address,uint256,uint256,bool)",
      "DisputeCancelled(uint256)",
      "JobFinalized(uint256,uint256,uint256,uint256)"};
  return events;
}

// ------------------------------------------------------------------ operation chain

Hash256 ops_start(const Hash256& leaf_prev) {
  Bytes data;
  auto tag = as_bytes("solvernet/ops/v1");
  data.insert(data.end(), tag.begin(), tag.end());
  data.insert(data.end(), leaf_prev.begin(), leaf_prev.end());
  return keccak256(data);
}

Hash256 commit_record_hash(const Hash256& state, const Hash256& inbound, const Hash256& outbound, const Hash256& leaf) {
  // abi.encodePacked("solvernet/op/v1", K(kind), uint32 layer, uint32 micro, uint32 n_in,
  // (K(name), hash)…, uint32 n_out, (K(name), hash)…), as the contract builds it.
  Bytes data;
  auto put = [&](std::span<const uint8_t> bytes) { data.insert(data.end(), bytes.begin(), bytes.end()); };
  auto put_u32 = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) data.push_back(static_cast<uint8_t>(v >> shift));
  };
  auto named = [&](std::string_view name, const Hash256& hash) {
    put(keccak256(as_bytes(name)));
    put(hash);
  };
  put(as_bytes("solvernet/op/v1"));
  put(keccak256(as_bytes("commit")));
  put_u32(0);
  put_u32(0);
  put_u32(3);
  named("state", state);
  named("inbound", inbound);
  named("outbound", outbound);
  put_u32(1);
  named("leaf", leaf);
  return keccak256(data);
}

Hash256 ops_link(const Hash256& r_prev, const Hash256& record) {
  std::array<uint8_t, 64> data;
  std::copy(r_prev.begin(), r_prev.end(), data.begin());
  std::copy(record.begin(), record.end(), data.begin() + 32);
  return keccak256(data);
}

DisputePhase phase_of(DisputeStage stage) {
  switch (stage) {
    case DisputeStage::step_claim:
    case DisputeStage::step_bisect: return DisputePhase::steps;
    case DisputeStage::ops_post:
    case DisputeStage::op_claim:
    case DisputeStage::op_bisect: return DisputePhase::ops;
    case DisputeStage::referee: return DisputePhase::referee;
    case DisputeStage::closed: return DisputePhase::closed;
    case DisputeStage::none: break;
  }
  return DisputePhase::none;
}

DisputeTurn turn_of(DisputeStage stage) {
  switch (stage) {
    case DisputeStage::step_claim:
    case DisputeStage::ops_post:
    case DisputeStage::op_claim: return DisputeTurn::solver;
    case DisputeStage::step_bisect:
    case DisputeStage::op_bisect: return DisputeTurn::challenger;
    case DisputeStage::referee: return DisputeTurn::referee;
    case DisputeStage::none:
    case DisputeStage::closed: break;
  }
  return DisputeTurn::none;
}

std::string_view stage_name(DisputeStage stage) {
  switch (stage) {
    case DisputeStage::none: return "none";
    case DisputeStage::step_claim: return "step_claim";
    case DisputeStage::step_bisect: return "step_bisect";
    case DisputeStage::ops_post: return "ops_post";
    case DisputeStage::op_claim: return "op_claim";
    case DisputeStage::op_bisect: return "op_bisect";
    case DisputeStage::referee: return "referee";
    case DisputeStage::closed: return "closed";
  }
  return "unknown";
}

// ------------------------------------------------------------------ dev chain

Result<std::unique_ptr<DevChain>> DevChain::start(const DevChainOptions& options) {
  std::unique_ptr<DevChain> chain(new DevChain());
  uint16_t port = options.port;
  if (port == 0) { SN_ASSIGN(port, free_loopback_port(SOCK_STREAM)); }
  auto contracts_dir = options.deploy.contracts_dir.empty() ? default_contracts_dir() : options.deploy.contracts_dir;
  // Another server on the port (an orphaned anvil, say) would answer our RPCs
  // in place of ours: refuse rather than deploy to, or report, someone else's chain.
  if (tcp_port_listening(port)) {
    auto holder = tcp_listener_pid(port);
    return kind_error(ErrorKind::unavailable, "port {} on 127.0.0.1 is already in use by {}; stop it or choose another --port",
                      port, holder ? describe_pid(*holder) : std::string("another process"));
  }
  std::vector<std::string> argv = {foundry_tool("anvil", contracts_dir).string(), "--host", "127.0.0.1",
                                   "--port", std::to_string(port), "--silent"};
  bool resumed = !options.state_file.empty() && std::filesystem::exists(options.state_file);
  if (!options.state_file.empty()) {
    argv.push_back("--state");
    argv.push_back(options.state_file.string());
  }
  SpawnOptions spawn;
  spawn.stdout_path = options.log_file.empty() ? "/dev/null" : options.log_file;
  spawn.stderr_path = spawn.stdout_path;
  // Its own group, so stopping it also stops what a wrapper (anvil from PATH
  // may be one) started; the kernel stops it if we die (parent_death_signal).
  spawn.new_process_group = true;
  SN_ASSIGN(chain->anvil_, ChildProcess::spawn(argv, spawn));
  chain->rpc_url_ = fmt::format("http://127.0.0.1:{}", port);
  chain->rpc_ = std::make_shared<RpcClient>(chain->rpc_url_, 5000);
  Result<uint64_t> chain_id = make_error("anvil did not answer");
  for (int attempt = 0; attempt < 300; ++attempt) {  // up to ~30 s on a loaded machine
    if (!chain->anvil_.running()) return make_error("anvil exited at start ({}); see its log", argv[0]);
    chain_id = chain->rpc_->chain_id();
    if (chain_id.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!chain_id.ok()) return make_error("anvil on port {} did not answer: {}", port, chain_id.message());
  // The answer must come from the anvil we started (a server that took the
  // port between our check and anvil's bind would answer too).
  if (auto listener = tcp_listener_pid(port); !listener || !is_same_or_group_member(*listener, chain->anvil_.pid()))
    return kind_error(ErrorKind::unavailable, "port {} is served by {}, not by the anvil this command started ({})", port,
                      listener ? describe_pid(*listener) : std::string("a process we cannot see"),
                      chain->anvil_.running() ? describe_pid(chain->anvil_.pid()) : std::string("it exited at start"));
  chain->funder_ = std::make_unique<Wallet>(chain->rpc_, anvil_funded_key(), *chain_id);
  auto deployment_path = options.state_file.empty() ? std::filesystem::path()
                                                    : std::filesystem::path(options.state_file.string() + ".deployment.json");
  if (resumed && std::filesystem::exists(deployment_path)) {
    SN_ASSIGN(chain->deployment_, Deployment::load(deployment_path));
    chain->deployment_.rpc_url = chain->rpc_url_;
  } else {
    SN_ASSIGN(chain->deployment_, deploy_market(chain->rpc_, anvil_funded_key(), options.deploy));
    if (!deployment_path.empty()) SN_TRY(chain->deployment_.save(deployment_path));
  }
  return chain;
}

DevChain::~DevChain() { anvil_.terminate(std::chrono::milliseconds(3000)); }

Status DevChain::fund(const Address& to, Wei amount) {
  auto sent = funder_->send(to, amount, {});
  if (!sent.ok()) return make_error("fund {}: {}", address_hex(to), sent.message());
  return ok_status();
}

Status DevChain::mine(uint64_t blocks) {
  SN_TRY(rpc_->call("anvil_mine", {to_quantity(blocks)}));
  return ok_status();
}

Result<Key> DevChain::node_key(const std::filesystem::path& data_dir, Wei amount) {
  SN_ASSIGN(Key key, Key::load_or_create(data_dir / "chain.key"));
  SN_ASSIGN(Wei balance, rpc_->balance(key.address()));
  if (balance < amount) SN_TRY(fund(key.address(), amount - balance));
  return key;
}

}  // namespace sn::chain
