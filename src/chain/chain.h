// EVM settlement client: keys, signed EIP-1559 transactions over JSON-RPC, the
// SolverMarket contract (contracts/src/SolverMarket.sol) and a local dev chain (anvil).
// Amounts are wei everywhere. Every call that talks to the chain returns Result and
// turns transport failures, hostile answers and reverts (with the contract's reason)
// into readable errors; nothing here throws.
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/hash.h"
#include "core/process.h"
#include "core/result.h"

namespace sn::chain {

using Bytes = std::vector<uint8_t>;
using Address = std::array<uint8_t, 20>;
using Wei = unsigned __int128;

using sn::keccak256;  // core/hash.h
std::string hex0x(std::span<const uint8_t> bytes);  // "0x" + lowercase hex
Result<Bytes> parse_hex0x(std::string_view text);    // accepts with or without 0x
std::string address_hex(const Address& address);
Result<Address> parse_address(std::string_view text);
inline constexpr Wei kMaxWei = ~static_cast<Wei>(0);  // 2^128 − 1: the largest amount any call takes
std::string wei_to_string(Wei amount);                // decimal
std::string wei_to_eth_string(Wei amount);            // decimal ETH, exact ("1.5", "0.000000000000000001")
// An amount typed by a user: a decimal number with an optional unit, "wei" (the
// default), "gwei" (10^9) or "eth"/"ether" (10^18), e.g. "1000", "2.5gwei", "0.1 eth".
// Checked against MAX (the largest value the amount's destination holds, e.g. 2^96 − 1
// for a job's price): negative, fractions of a wei, malformed text and values above MAX
// are input errors (exit 2) naming the problem and the limit; nothing wraps.
Result<Wei> parse_wei(std::string_view text, Wei max = kMaxWei);

// A secp256k1 account key. The file format is the 64-char hex secret and a newline,
// mode 0600.
class Key {
 public:
  static Key generate();
  static Result<Key> from_hex(std::string_view secret_hex);
  static Result<Key> load(const std::filesystem::path& path);
  // Loads PATH, or creates and saves a new key there if it does not exist.
  static Result<Key> load_or_create(const std::filesystem::path& path);
  Status save(const std::filesystem::path& path) const;

  const Address& address() const { return address_; }
  std::string secret_hex() const;
  // Recoverable signature over a 32-byte digest: r, s, recovery id (y parity).
  struct Signature { std::array<uint8_t, 32> r, s; uint8_t y_parity; };
  Signature sign(const Hash256& digest) const;

 private:
  std::array<uint8_t, 32> secret_{};
  Address address_{};
};

// The funded account #0 of every anvil (a published dev key; never use it elsewhere).
Key anvil_funded_key();

// JSON-RPC 2.0 over HTTP (libcurl). Thread-safe: each call uses its own handle.
class RpcClient {
 public:
  explicit RpcClient(std::string url, int timeout_ms = 10000);
  // The "result" member, or an error naming the method and the server's message
  // (including revert data, decoded if it is Error(string)). REJECTED, if given, is set
  // to whether the server answered with an error (true) or could not be reached or
  // gave no JSON-RPC answer (false: a request may then have been received anyway).
  Result<nlohmann::json> call(const std::string& method, nlohmann::json params,
                              bool* rejected = nullptr) const;
  const std::string& url() const { return url_; }

  Result<uint64_t> chain_id() const;
  Result<uint64_t> block_number() const;
  Result<Wei> balance(const Address& address) const;

 private:
  std::string url_;
  int timeout_ms_;
};

struct LogEntry {
  Address address{};
  std::vector<Hash256> topics;
  Bytes data;
};

struct Receipt {
  std::string tx_hash;
  uint64_t block = 0;
  uint64_t gas_used = 0;
  std::optional<Address> contract_address;
  std::vector<LogEntry> logs;
};

// Signs and sends transactions from one key. Nonces stay right under concurrency
// (a mutex hands them out in order) and across restarts (the first send, and any
// send after a nonce error, re-reads the chain's pending nonce).
//
// With a JOURNAL file (e.g. DATA_DIR/chain.journal, format in docs/contracts.md) a
// signed transaction is written there before it is sent and marked done once mined.
// A process killed at any point leaves the journal consistent; the next Wallet on it
// first re-sends the very same signed transactions (same nonce, same hash) in nonce
// order and waits for them, so a transaction is never lost, never sent twice under two
// nonces, and leaves no nonce gap. A caller that names an ACTION gets exactly-once:
// once the journal holds that action (pending or done), send() with the same name
// returns its receipt instead of sending anew, so a restarted program can simply redo
// its whole sequence of named actions. (One name is sent by one thread at a time.)
class Wallet {
 public:
  Wallet(std::shared_ptr<const RpcClient> rpc, Key key, uint64_t chain_id,
         std::filesystem::path journal = {});

  const Address& address() const { return key_.address(); }
  const Key& key() const { return key_; }
  // Estimates gas (a revert comes back as the contract's reason), signs, sends and
  // waits for the receipt; a mined failure is an error too. ACTION (with a journal):
  // see above; its names are the caller's, any string.
  Result<Receipt> send(std::optional<Address> to, Wei value, const Bytes& data, std::string_view action = {});
  // Re-sends and waits for journaled transactions a killed process left; returns how
  // many there were. send() calls it once by itself.
  Result<size_t> finish_pending();

  // Points in a send at which a test may kill the process (SIGKILL from the hook).
  enum class Step { journaled, sent, mined };
  using StepHook = std::function<void(Step, std::string_view action)>;
  void set_step_hook(StepHook hook) { hook_ = std::move(hook); }

 private:
  struct Sent {
    std::string hash, key;  // the transaction and its journal key, when sent
    std::string error;      // else why not
    bool rejected = false;  // the node refused it (it will never be mined)
  };
  Result<Sent> sign_and_send(std::optional<Address> to, Wei value, const Bytes& data, std::string_view action);
  Result<nlohmann::json> wait_mined(const std::string& hash);  // the receipt JSON
  Result<size_t> finish_pending_locked();
  Result<nlohmann::json> journal_read() const;
  Status journal_write(const nlohmann::json& entries) const;
  Status journal_mark_done(const std::string& key);
  std::filesystem::path journal_;
  bool recovered_ = false;
  std::shared_ptr<const RpcClient> rpc_;
  Key key_;
  uint64_t chain_id_;
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();  // movable wallet
  std::optional<uint64_t> next_nonce_;
  StepHook hook_;
};

// Where the market lives: written by `chain up` / `chain deploy` as JSON.
struct Deployment {
  uint64_t chain_id = 0;
  std::string rpc_url;
  Address market{};
  uint64_t deploy_block = 0;
  std::string abi_hash;  // keccak256 of the contract's ABI JSON, to catch mismatches
  uint64_t unbonding_blocks = 0;
  uint64_t turn_blocks = 0;

  nlohmann::json to_json() const;
  static Result<Deployment> from_json(const nlohmann::json& json);
  static Result<Deployment> load(const std::filesystem::path& path);
  Status save(const std::filesystem::path& path) const;
};

// The market `chain up` deploys on a dev chain at RPC: the first contract anvil's funded
// account creates (nonce 0), checked to answer as a SolverMarket. For wallet commands
// given --rpc and no deployment file; other chains need the deployment JSON.
Result<Deployment> find_dev_deployment(std::shared_ptr<const RpcClient> rpc);

struct DeployOptions {
  uint64_t unbonding_blocks = 20;
  uint64_t turn_blocks = 10;
  std::filesystem::path contracts_dir;  // empty: $SOLVERNET_SOURCE_DIR/contracts or the build's source
};

// Deploys SolverMarket from contracts/out (running the offline `forge build` if needed).
Result<Deployment> deploy_market(std::shared_ptr<const RpcClient> rpc, const Key& deployer,
                                 const DeployOptions& options = {});

// A job's terms as SolverMarket.postJob takes them. Price < 2^96, fee < 2^80 and
// stake < 2^88 wei (the contract packs them); post_job refuses larger values. Parse a
// user's figure for them with parse_wei(text, kMaxPricePerSolver) etc.
inline constexpr Wei kMaxPricePerSolver = (static_cast<Wei>(1) << 96) - 1;
inline constexpr Wei kMaxVerifierFee = (static_cast<Wei>(1) << 80) - 1;
inline constexpr Wei kMaxStakePerRole = (static_cast<Wei>(1) << 88) - 1;
struct JobTerms {
  uint16_t solver_count = 1;
  uint16_t verifier_count = 0;
  Wei price_per_solver = 0;
  Wei verifier_fee = 0;
  Wei stake_per_role = 0;
  uint32_t commit_blocks = 100;
  uint32_t challenge_window_blocks = 5;
  Address referee{};  // zero: the submitter referees (the cheapest job to post)
  Hash256 spec{};
  Wei escrow() const { return price_per_solver * solver_count + verifier_fee * verifier_count; }
};

// Where a dispute stands (SolverMarket.Stage): whose move it is and what it is.
enum class DisputeStage : uint8_t {
  none = 0,
  step_claim = 1,   // solver: claim_leaf at mid = (lo + hi) / 2
  step_bisect = 2,  // challenger: bisect
  ops_post = 3,     // solver: post_ops for step `step`
  op_claim = 4,     // solver: claim_op at mid
  op_bisect = 5,    // challenger: bisect
  referee = 6,      // the job's referee: resolve (operation hi, chain hashes lo_hash → hi_hash)
  closed = 7,
};
enum class DisputePhase { none, steps, ops, referee, closed };
enum class DisputeTurn { none, solver, challenger, referee };
DisputePhase phase_of(DisputeStage stage);
DisputeTurn turn_of(DisputeStage stage);
std::string_view stage_name(DisputeStage stage);  // "step_claim", …

// SolverMarket.getDispute. Indices lo/hi are leaves (step phase) or operations (ops
// phase, 0 … op_count); lo_hash is agreed, hi_hash the solver's; mid_hash the solver's
// last claim. deadline: the last block for the party whose turn it is.
struct DisputeState {
  DisputeStage stage = DisputeStage::none;
  DisputePhase phase = DisputePhase::none;
  DisputeTurn turn = DisputeTurn::none;
  uint64_t job = 0;
  Address solver{}, challenger{};
  uint64_t step = 0;  // the disputed step t (leaf t), once narrowed to one step
  uint64_t lo = 0, hi = 0, op_count = 0;
  Hash256 lo_hash{}, hi_hash{}, mid_hash{};
  uint64_t deadline = 0;
  Wei bond = 0;
};

// A solver's commitment as the market holds it (root zero: none, slashed or paid).
struct CommitState {
  Hash256 root{};
  uint64_t leaf_count = 0;
  bool is_final = false;
};

// SolverMarket.getJob: the terms and the job's progress.
struct JobState {
  Address submitter{}, referee{};
  uint16_t solver_count = 0, verifier_count = 0;
  Wei price_per_solver = 0, verifier_fee = 0, stake_per_role = 0;
  uint64_t commit_deadline = 0, challenge_window = 0, last_commit_block = 0;
  uint16_t committed = 0, verifiers_accepted = 0, open_disputes = 0, seated = 0;
  bool finalized = false, all_final = false;
};

// What the contract recomputes of the operation chain (docs/contracts.md):
// r_0 = K("solvernet/ops/v1" ‖ leaf_{t-1}); the `commit` operation's record hash (inputs
// state, inbound, outbound; output leaf); one link r_j = K(r_{j-1} ‖ record_j).
Hash256 ops_start(const Hash256& leaf_prev);
Hash256 commit_record_hash(const Hash256& state, const Hash256& inbound, const Hash256& outbound, const Hash256& leaf);
Hash256 ops_link(const Hash256& r_prev, const Hash256& record);

// Every SolverMarket event's signature (topic 0 is its Keccak-256), for log readers.
const std::vector<std::string_view>& market_events();

// One key's view of the market. Thread-safe (the Wallet serialises nonces).
// Transactions revert with the contract's reason (e.g. "not the solver's turn",
// "bad Merkle proof", "turn deadline passed"), returned as the error message; a
// reverted call changes nothing on chain.
class MarketClient {
 public:
  // JOURNAL: see Wallet (a node passes DATA_DIR/chain.journal).
  MarketClient(std::shared_ptr<const RpcClient> rpc, Deployment deployment, Key key,
               std::filesystem::path journal = {});
  // A node's client: key DATA_DIR/chain.key (created if missing), journal DATA_DIR/chain.journal.
  static Result<MarketClient> for_data_dir(std::shared_ptr<const RpcClient> rpc, Deployment deployment,
                                           const std::filesystem::path& data_dir);

  const Address& address() const { return wallet_.address(); }
  const Deployment& deployment() const { return deployment_; }
  Wallet& wallet() { return wallet_; }
  const RpcClient& rpc() const { return *rpc_; }

  // ACTION names the call for the journal's exactly-once (see Wallet); empty: none.
  Result<Receipt> register_node(const Hash256& node_id, Wei stake, std::string_view action = {});
  Result<Receipt> stake(Wei amount, std::string_view action = {});
  Result<Receipt> unstake(Wei amount);
  Result<Receipt> withdraw();
  // Returns the new job's id (from its JobPosted event).
  Result<uint64_t> post_job(const JobTerms& terms, Receipt* receipt = nullptr);
  // Commits ROOT over LEAF_COUNT leaves (< 2^48). The first commit takes a seat and
  // locks stakePerRole; until IS_FINAL, later ones replace the root (leaf_count must grow).
  Result<Receipt> commit(uint64_t job_id, const Hash256& root, uint64_t leaf_count, bool is_final,
                         std::string_view action = {});
  // K(blockhash(seed block) ‖ job): errors ("commits not final yet", "seed block not
  // mined yet") until it exists. The same seed picks the segments a verifier replays.
  // (An automining dev chain makes a block per transaction only: DevChain::mine(2)
  // after the last commit makes the seed block and one after it.)
  Result<Hash256> verifier_seed(uint64_t job_id) const;
  // The node that may take verifier seat SEAT at the latest block (zero address: none
  // eligible). A selected node that stays silent turn_blocks is passed over.
  Result<Address> selected_verifier(uint64_t job_id, uint64_t seat) const;
  // Takes the next verifier seat; only the selected verifier may.
  Result<Receipt> accept(uint64_t job_id, std::string_view action = {});
  // Disputes SOLVER's commit: agrees with leaf LO, disputes leaf HI (lo < hi < leaf
  // count), each with its Merkle proof (siblings bottom-up, as core/merkle.h's
  // merkle_proof(leaves, index, MerkleHash::keccak256).siblings). Returns the dispute id.
  Result<uint64_t> challenge(uint64_t job_id, const Address& solver, uint64_t lo, const Hash256& lo_leaf,
                             const std::vector<Hash256>& lo_proof, uint64_t hi, const Hash256& hi_leaf,
                             const std::vector<Hash256>& hi_proof, Wei bond, Receipt* receipt = nullptr);
  // Solver, step phase: its leaf at mid = (lo + hi) / 2 with the proof.
  Result<Receipt> claim_leaf(uint64_t dispute_id, const Hash256& leaf, const std::vector<Hash256>& proof);
  // Challenger, either phase: whether it agrees with the solver's claim at mid.
  Result<Receipt> bisect(uint64_t dispute_id, bool agree);
  // Solver, opening the operation phase of step t = hi: the step's operation count m
  // (≥ 1), r_{m-1} and the commit operation's inputs.
  Result<Receipt> post_ops(uint64_t dispute_id, uint64_t op_count, const Hash256& r_prev, const Hash256& state_hash,
                           const Hash256& inbound_digest, const Hash256& outbound_digest);
  // Solver, operation phase: the chain hash r_mid after operation mid = (lo + hi) / 2.
  Result<Receipt> claim_op(uint64_t dispute_id, const Hash256& r_mid);
  // The job's referee, within refereeBlocks of the referee's turn.
  Result<Receipt> resolve(uint64_t dispute_id, bool solver_wins);
  // Anyone, after the deadline: the silent party loses; a silent referee cancels.
  Result<Receipt> timeout(uint64_t dispute_id);
  // Pays the job's live solvers and verifiers, read from its events.
  Result<Receipt> finalize(uint64_t job_id);

  Result<Wei> stake_of(const Address& node) const;
  Result<Wei> withdrawable_of(const Address& account) const;
  Result<Wei> balance_of(const Address& account) const { return rpc_->balance(account); }
  Result<bool> is_registered(const Address& node) const;
  Result<bool> is_verifier(uint64_t job_id, const Address& account) const;
  Result<Hash256> commit_of(uint64_t job_id, const Address& solver) const;
  Result<CommitState> commit_state(uint64_t job_id, const Address& solver) const;
  Result<JobState> job(uint64_t job_id) const;
  // The dispute over SOLVER's commit in the job, 0 if never challenged.
  Result<uint64_t> dispute_of(uint64_t job_id, const Address& solver) const;
  // A party polls this to take its turn (stage, ends, hashes, deadline); an unknown id
  // is a not_found error. job() likewise for an unknown job.
  Result<DisputeState> dispute(uint64_t dispute_id) const;
  // Whether LEAF is leaf INDEX of the COUNT-leaf tree ROOT, as the contract checks it.
  Result<bool> verify_leaf(const Hash256& root, uint64_t count, uint64_t index, const Hash256& leaf,
                           const std::vector<Hash256>& proof) const;

 private:
  Result<Receipt> call_market(std::string_view signature, const Bytes& args, Wei value = 0,
                              std::string_view action = {});
  Result<Bytes> view(std::string_view signature, const Bytes& args) const;
  std::shared_ptr<const RpcClient> rpc_;
  Deployment deployment_;
  Wallet wallet_;
};

// ABI encoding of static words, for callers building their own calls.
namespace abi {
Bytes selector(std::string_view signature);
void put_uint(Bytes& out, Wei value);
void put_address(Bytes& out, const Address& address);
void put_bytes32(Bytes& out, const Hash256& word);
// A bytes32[] tail: length, then the words.
void put_bytes32_array(Bytes& out, const std::vector<Hash256>& words);
Result<std::string> decode_revert(std::span<const uint8_t> data);  // Error(string)
}  // namespace abi

// RLP, exposed for tests.
namespace rlp {
Bytes encode_bytes(std::span<const uint8_t> bytes);
Bytes encode_uint(Wei value);
Bytes encode_list(const std::vector<Bytes>& items);
}  // namespace rlp

struct DevChainOptions {
  uint16_t port = 0;                     // 0: a free port
  std::filesystem::path state_file;      // empty: none; else anvil --state (load + dump)
  std::filesystem::path log_file;        // anvil's output; empty: /dev/null
  DeployOptions deploy;
};

// A local chain: anvil on 127.0.0.1 with the market deployed. The destructor stops it.
class DevChain {
 public:
  static Result<std::unique_ptr<DevChain>> start(const DevChainOptions& options = {});
  ~DevChain();

  const std::string& rpc_url() const { return rpc_url_; }
  std::shared_ptr<const RpcClient> rpc() const { return rpc_; }
  const Deployment& deployment() const { return deployment_; }
  pid_t pid() const { return anvil_.pid(); }

  // Sends AMOUNT from anvil's funded account.
  Status fund(const Address& to, Wei amount);
  // Mines BLOCKS empty blocks (anvil_mine), e.g. to pass a challenge window.
  Status mine(uint64_t blocks);
  // The key in DATA_DIR/chain.key (created if missing), funded with AMOUNT if its
  // balance is below it.
  Result<Key> node_key(const std::filesystem::path& data_dir, Wei amount);

 private:
  DevChain() = default;
  ChildProcess anvil_;
  std::string rpc_url_;
  std::shared_ptr<const RpcClient> rpc_;
  Deployment deployment_;
  std::unique_ptr<Wallet> funder_;
};

// Path of the anvil/forge binaries (contracts/node_modules/.bin, else PATH).
std::filesystem::path foundry_tool(const std::string& name, const std::filesystem::path& contracts_dir);
std::filesystem::path default_contracts_dir();

}  // namespace sn::chain
