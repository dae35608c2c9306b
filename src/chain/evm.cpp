// Primitives: Keccak-256, hex, RLP, ABI words, secp256k1 keys, JSON-RPC over libcurl.
#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <secp256k1.h>
#include <secp256k1_recovery.h>
#include <sodium.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "chain/chain.h"
#include "core/fs.h"

namespace sn::chain {

std::string hex0x(std::span<const uint8_t> bytes) { return "0x" + to_hex(bytes); }

Result<Bytes> parse_hex0x(std::string_view text) {
  if (text.starts_with("0x") || text.starts_with("0X")) text.remove_prefix(2);
  if (text.size() % 2 != 0) return make_error("hex string has odd length");
  Bytes out;
  out.reserve(text.size() / 2);
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < text.size(); i += 2) {
    int hi = nibble(text[i]), lo = nibble(text[i + 1]);
    if (hi < 0 || lo < 0) return make_error("not a hex string: '{}'", text.substr(0, 20));
    out.push_back(static_cast<uint8_t>(hi * 16 + lo));
  }
  return out;
}

std::string address_hex(const Address& address) { return hex0x(address); }

Result<Address> parse_address(std::string_view text) {
  SN_ASSIGN(Bytes bytes, parse_hex0x(text));
  if (bytes.size() != 20) return input_error("address must be 20 bytes, got '{}'", text);
  Address address;
  std::copy(bytes.begin(), bytes.end(), address.begin());
  return address;
}

std::string wei_to_string(Wei amount) {
  if (amount == 0) return "0";
  std::string digits;
  while (amount > 0) {
    digits.push_back(static_cast<char>('0' + static_cast<int>(amount % 10)));
    amount /= 10;
  }
  std::reverse(digits.begin(), digits.end());
  return digits;
}

std::string wei_to_eth_string(Wei amount) {
  const Wei one_eth = static_cast<Wei>(1000000000000000000ULL);
  std::string whole = wei_to_string(amount / one_eth);
  std::string fraction = wei_to_string(amount % one_eth);
  if (amount % one_eth == 0) return whole;
  fraction.insert(0, 18 - fraction.size(), '0');
  while (fraction.back() == '0') fraction.pop_back();
  return whole + "." + fraction;
}

Result<Wei> parse_wei(std::string_view text, Wei max) {
  const std::string_view original = text;
  auto malformed = [&] {
    return input_error("amount '{}' is not a number of wei: write N or N.D with an optional unit wei, gwei or eth "
                       "(e.g. 1000, 2.5gwei, 0.1eth)", original);
  };
  // The unit: how many decimal places of the number lie below one of it.
  size_t decimals = 0;
  std::string_view unit = "wei";
  for (auto [suffix, places] : {std::pair<std::string_view, size_t>{"gwei", 9}, {"wei", 0}, {"ether", 18}, {"eth", 18}})
    if (text.ends_with(suffix)) {
      text.remove_suffix(suffix.size());
      unit = suffix;
      decimals = places;
      break;
    }
  if (!text.empty() && text.back() == ' ') text.remove_suffix(1);  // "2 eth"
  if (text.starts_with('-')) return input_error("amount '{}' is negative: amounts are whole wei from 0", original);
  const size_t dot = text.find('.');
  std::string_view whole = text.substr(0, dot);
  std::string_view fraction = dot == std::string_view::npos ? std::string_view() : text.substr(dot + 1);
  if (whole.empty() && fraction.empty()) return malformed();
  for (std::string_view part : {whole, fraction})
    for (char c : part)
      if (c < '0' || c > '9') return malformed();
  // Digits below one wei must be zeros: a fraction of a wei cannot be sent.
  if (fraction.size() > decimals) {
    if (fraction.substr(decimals).find_first_not_of('0') != std::string_view::npos)
      return input_error("amount '{}' has a fraction of a wei: {} takes at most {} decimal place(s)", original, unit,
                         decimals);
    fraction = fraction.substr(0, decimals);
  }
  std::string digits = std::string(whole) + std::string(fraction) + std::string(decimals - fraction.size(), '0');
  Wei value = 0;
  for (char c : digits) {
    const Wei d = static_cast<Wei>(c - '0');
    if (value > (max - d) / 10)  // value·10 + d would exceed MAX (or wrap)
      return input_error("amount '{}' is too large: at most {} wei ({} eth)", original, wei_to_string(max),
                         wei_to_eth_string(max));
    value = value * 10 + d;
  }
  return value;
}

static Result<Wei> parse_quantity(const nlohmann::json& value, const char* what);

// A quantity the protocol bounds to 64 bits (chain id, block, gas, nonce): a larger
// answer is refused, not truncated.
static Result<uint64_t> parse_quantity_u64(const nlohmann::json& value, const char* what) {
  SN_ASSIGN(Wei quantity, parse_quantity(value, what));
  if (quantity >> 64) return make_error("RPC answer: {} {} does not fit in 64 bits", what, wei_to_string(quantity));
  return static_cast<uint64_t>(quantity);
}

static Result<Wei> parse_quantity(const nlohmann::json& value, const char* what) {
  if (!value.is_string()) return make_error("RPC answer: {} is not a hex string", what);
  auto text = value.get<std::string>();
  if (!text.starts_with("0x") || text.size() < 3 || text.size() > 34)
    return make_error("RPC answer: {} is not a quantity: '{}'", what, text.substr(0, 40));
  Wei out = 0;
  for (size_t i = 2; i < text.size(); ++i) {
    char c = text[i];
    int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
          : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    if (v < 0) return make_error("RPC answer: {} is not a quantity: '{}'", what, text.substr(0, 40));
    out = out * 16 + static_cast<Wei>(v);
  }
  return out;
}

// ------------------------------------------------------------------ RLP

namespace rlp {
static Bytes length_prefix(size_t length, uint8_t short_base) {
  if (length < 56) return {static_cast<uint8_t>(short_base + length)};
  Bytes len;
  for (size_t l = length; l > 0; l >>= 8) len.insert(len.begin(), static_cast<uint8_t>(l & 0xff));
  Bytes out{static_cast<uint8_t>(short_base + 55 + len.size())};
  out.insert(out.end(), len.begin(), len.end());
  return out;
}

Bytes encode_bytes(std::span<const uint8_t> bytes) {
  if (bytes.size() == 1 && bytes[0] < 0x80) return {bytes[0]};
  Bytes out = length_prefix(bytes.size(), 0x80);
  out.insert(out.end(), bytes.begin(), bytes.end());
  return out;
}

Bytes encode_uint(Wei value) {
  Bytes be;
  for (; value > 0; value >>= 8) be.insert(be.begin(), static_cast<uint8_t>(value & 0xff));
  return encode_bytes(be);
}

Bytes encode_list(const std::vector<Bytes>& items) {
  size_t total = 0;
  for (const auto& item : items) total += item.size();
  Bytes out = length_prefix(total, 0xc0);
  for (const auto& item : items) out.insert(out.end(), item.begin(), item.end());
  return out;
}
}  // namespace rlp

// ------------------------------------------------------------------ ABI

namespace abi {
Bytes selector(std::string_view signature) {
  auto digest = keccak256(as_bytes(signature));
  return Bytes(digest.begin(), digest.begin() + 4);
}

void put_uint(Bytes& out, Wei value) {
  uint8_t word[32] = {};
  for (int i = 31; i >= 0 && value > 0; --i, value >>= 8) word[i] = static_cast<uint8_t>(value & 0xff);
  out.insert(out.end(), word, word + 32);
}

void put_address(Bytes& out, const Address& address) {
  out.insert(out.end(), 12, 0);
  out.insert(out.end(), address.begin(), address.end());
}

void put_bytes32(Bytes& out, const Hash256& word) { out.insert(out.end(), word.begin(), word.end()); }
void put_bytes32_array(Bytes& out, const std::vector<Hash256>& words) {
  put_uint(out, words.size());
  for (const auto& word : words) put_bytes32(out, word);
}

Result<std::string> decode_revert(std::span<const uint8_t> data) {
  static const Bytes error_selector = selector("Error(string)");
  if (data.size() < 4 + 64 || !std::equal(error_selector.begin(), error_selector.end(), data.begin()))
    return make_error("revert data is not Error(string)");
  auto body = data.subspan(4);
  auto read_word = [&](size_t offset) -> std::optional<uint64_t> {
    if (offset + 32 > body.size()) return std::nullopt;
    for (size_t i = offset; i < offset + 24; ++i) if (body[i] != 0) return std::nullopt;
    uint64_t v = 0;
    for (size_t i = offset + 24; i < offset + 32; ++i) v = (v << 8) | body[i];
    return v;
  };
  auto offset = read_word(0);
  if (!offset) return make_error("revert data: bad string offset");
  auto length = read_word(*offset);
  if (!length || *offset + 32 + *length > body.size()) return make_error("revert data: bad string length");
  return std::string(reinterpret_cast<const char*>(body.data() + *offset + 32), *length);
}
}  // namespace abi

// ------------------------------------------------------------------ keys

static const secp256k1_context* secp_context() {
  static secp256k1_context* context =
      secp256k1_context_create(SECP256K1_CONTEXT_SIGN | SECP256K1_CONTEXT_VERIFY);
  return context;
}

static Result<Address> address_of_secret(const std::array<uint8_t, 32>& secret) {
  secp256k1_pubkey pubkey;
  if (!secp256k1_ec_pubkey_create(secp_context(), &pubkey, secret.data()))
    return input_error("secret key is not a valid secp256k1 key");
  uint8_t serialized[65];
  size_t length = sizeof serialized;
  secp256k1_ec_pubkey_serialize(secp_context(), serialized, &length, &pubkey, SECP256K1_EC_UNCOMPRESSED);
  auto digest = keccak256(std::span<const uint8_t>(serialized + 1, 64));
  Address address;
  std::copy(digest.begin() + 12, digest.end(), address.begin());
  return address;
}

Key Key::generate() {
  for (;;) {
    std::array<uint8_t, 32> secret;
    randombytes_buf(secret.data(), secret.size());
    if (secp256k1_ec_seckey_verify(secp_context(), secret.data())) {
      Key key;
      key.secret_ = secret;
      key.address_ = address_of_secret(secret).value();
      return key;
    }
  }
}

Result<Key> Key::from_hex(std::string_view secret_hex) {
  while (!secret_hex.empty() && std::isspace(static_cast<unsigned char>(secret_hex.back()))) secret_hex.remove_suffix(1);
  auto bytes = parse_hex0x(secret_hex);
  if (!bytes.ok() || bytes->size() != 32) return input_error("a key is 32 bytes of hex");
  Key key;
  std::copy(bytes->begin(), bytes->end(), key.secret_.begin());
  SN_ASSIGN(key.address_, address_of_secret(key.secret_));
  return key;
}

Result<Key> Key::load(const std::filesystem::path& path) {
  SN_ASSIGN(std::string text, read_file(path));
  auto key = from_hex(text);
  if (!key.ok()) return input_error("{}: {}", path.string(), key.message());
  return key;
}

Result<Key> Key::load_or_create(const std::filesystem::path& path) {
  if (std::filesystem::exists(path)) return load(path);
  Key key = generate();
  SN_TRY(key.save(path));
  return key;
}

Status Key::save(const std::filesystem::path& path) const {
  if (path.has_parent_path()) SN_TRY(ensure_directory(path.parent_path()));
  return write_file_atomic(path, secret_hex() + "\n", 0600);
}

std::string Key::secret_hex() const { return to_hex(secret_); }

Key::Signature Key::sign(const Hash256& digest) const {
  secp256k1_ecdsa_recoverable_signature signature;
  secp256k1_ecdsa_sign_recoverable(secp_context(), &signature, digest.data(), secret_.data(), nullptr, nullptr);
  uint8_t compact[64];
  int recovery_id = 0;
  secp256k1_ecdsa_recoverable_signature_serialize_compact(secp_context(), compact, &recovery_id, &signature);
  Signature out;
  std::copy(compact, compact + 32, out.r.begin());
  std::copy(compact + 32, compact + 64, out.s.begin());
  out.y_parity = static_cast<uint8_t>(recovery_id);
  return out;
}

Key anvil_funded_key() {
  return Key::from_hex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80").value();
}

// ------------------------------------------------------------------ JSON-RPC

RpcClient::RpcClient(std::string url, int timeout_ms) : url_(std::move(url)), timeout_ms_(timeout_ms) {
  static const bool initialised = [] { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }();
  (void)initialised;
}

static size_t append_body(char* data, size_t size, size_t count, void* user) {
  auto* body = static_cast<std::string*>(user);
  if (body->size() > (64u << 20)) return 0;  // a hostile endless answer
  body->append(data, size * count);
  return size * count;
}

Result<nlohmann::json> RpcClient::call(const std::string& method, nlohmann::json params, bool* rejected) const {
  if (rejected) *rejected = false;
  nlohmann::json request = {{"jsonrpc", "2.0"}, {"id", 1}, {"method", method}, {"params", std::move(params)}};
  std::string payload = request.dump();
  std::string body;
  CURL* curl = curl_easy_init();
  if (!curl) return make_error("{}: cannot create an HTTP handle", method);
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  curl_easy_setopt(curl, CURLOPT_URL, url_.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, payload.c_str());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(payload.size()));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, append_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms_));
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  CURLcode code = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(headers);
  curl_easy_cleanup(curl);
  if (code != CURLE_OK) return make_error("{} to {}: {}", method, url_, curl_easy_strerror(code));
  auto answer = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (answer.is_discarded() || !answer.is_object())
    return make_error("{} to {}: answer is not a JSON-RPC object (HTTP {})", method, url_, status);
  if (auto error = answer.find("error"); error != answer.end() && !error->is_null()) {
    if (rejected) *rejected = true;
    std::string message = error->is_object() && error->contains("message") && (*error)["message"].is_string()
                              ? (*error)["message"].get<std::string>()
                              : error->dump();
    if (error->is_object() && error->contains("data") && (*error)["data"].is_string()) {
      auto data = parse_hex0x((*error)["data"].get<std::string>());
      if (data.ok()) {
        auto reason = abi::decode_revert(*data);
        if (reason.ok()) return make_error("reverted: {}", *reason);
      }
    }
    return make_error("{}: {}", method, message);
  }
  auto result = answer.find("result");
  if (result == answer.end()) return make_error("{} to {}: answer has no result", method, url_);
  return *result;
}

Result<uint64_t> RpcClient::chain_id() const {
  SN_ASSIGN(auto json, call("eth_chainId", nlohmann::json::array()));
  return parse_quantity_u64(json, "chain id");
}

Result<uint64_t> RpcClient::block_number() const {
  SN_ASSIGN(auto json, call("eth_blockNumber", nlohmann::json::array()));
  return parse_quantity_u64(json, "block number");
}

Result<Wei> RpcClient::balance(const Address& address) const {
  SN_ASSIGN(auto json, call("eth_getBalance", {address_hex(address), "latest"}));
  return parse_quantity(json, "balance");
}

static Result<Receipt> parse_receipt(const nlohmann::json& json) {
  if (!json.is_object()) return make_error("RPC answer: receipt is not an object");
  Receipt receipt;
  if (!json.contains("transactionHash") || !json["transactionHash"].is_string())
    return make_error("RPC answer: receipt lacks transactionHash");
  receipt.tx_hash = json["transactionHash"].get<std::string>();
  SN_ASSIGN(uint64_t block, parse_quantity_u64(json.value("blockNumber", nlohmann::json()), "receipt block"));
  SN_ASSIGN(uint64_t gas, parse_quantity_u64(json.value("gasUsed", nlohmann::json()), "receipt gasUsed"));
  SN_ASSIGN(Wei status, parse_quantity(json.value("status", nlohmann::json()), "receipt status"));
  receipt.block = block;
  receipt.gas_used = gas;
  if (status != 1) return make_error("transaction {} failed on chain (gas used {})", receipt.tx_hash, receipt.gas_used);
  if (json.contains("contractAddress") && json["contractAddress"].is_string()) {
    SN_ASSIGN(receipt.contract_address, parse_address(json["contractAddress"].get<std::string>()));
  }
  if (json.contains("logs") && json["logs"].is_array()) {
    for (const auto& log : json["logs"]) {
      if (!log.is_object() || !log.contains("address") || !log["address"].is_string() ||
          !log.contains("data") || !log["data"].is_string() || !log.contains("topics") || !log["topics"].is_array())
        return make_error("RPC answer: malformed log in receipt");
      LogEntry entry;
      SN_ASSIGN(entry.address, parse_address(log["address"].get<std::string>()));
      SN_ASSIGN(entry.data, parse_hex0x(log["data"].get<std::string>()));
      for (const auto& topic : log["topics"]) {
        if (!topic.is_string()) return make_error("RPC answer: malformed log topic");
        SN_ASSIGN(Bytes bytes, parse_hex0x(topic.get<std::string>()));
        if (bytes.size() != 32) return make_error("RPC answer: log topic is not 32 bytes");
        Hash256 word;
        std::copy(bytes.begin(), bytes.end(), word.begin());
        entry.topics.push_back(word);
      }
      receipt.logs.push_back(std::move(entry));
    }
  }
  return receipt;
}

// ------------------------------------------------------------------ wallet

Wallet::Wallet(std::shared_ptr<const RpcClient> rpc, Key key, uint64_t chain_id, std::filesystem::path journal)
    : journal_(std::move(journal)), rpc_(std::move(rpc)), key_(std::move(key)), chain_id_(chain_id) {}

namespace {
// What nodes (anvil, geth, erigon, reth) answer to a raw transaction they already hold.
bool already_known(const std::string& message) {
  for (const char* text : {"already imported", "already known", "known transaction", "AlreadyKnown", "already exists"})
    if (message.find(text) != std::string::npos) return true;
  return false;
}

bool nonce_too_low(const std::string& message) {
  return message.find("nonce too low") != std::string::npos || message.find("NonceTooLow") != std::string::npos;
}

std::string journal_key(std::string_view action, const std::string& hash) {
  return action.empty() ? "tx:" + hash : "action:" + std::string(action);
}
}  // namespace

// Journal: a JSON object {key: entry}; key "action:NAME" for a named action, "tx:HASH"
// otherwise; entry {"nonce", "hash", "raw"} while pending, {"nonce", "hash", "done": true}
// once mined (named actions only; anonymous ones are dropped). Callers hold mutex_.
Result<nlohmann::json> Wallet::journal_read() const {
  if (journal_.empty() || !std::filesystem::exists(journal_)) return nlohmann::json::object();
  SN_ASSIGN(std::string text, read_file(journal_));
  auto entries = nlohmann::json::parse(text, nullptr, false);
  if (!entries.is_object()) return make_error("{}: journal is not a JSON object", journal_.string());
  for (const auto& [key, entry] : entries.items()) {
    bool done = entry.is_object() && entry.value("done", false);
    if (!entry.is_object() || !entry.contains("hash") || !entry["hash"].is_string() || !entry.contains("nonce") ||
        !entry["nonce"].is_number_unsigned() || (!done && !(entry.contains("raw") && entry["raw"].is_string())))
      return make_error("{}: journal entry \"{}\" is malformed", journal_.string(), key);
  }
  return entries;
}

Status Wallet::journal_write(const nlohmann::json& entries) const {
  if (journal_.empty()) return ok_status();
  return write_file_atomic(journal_, entries.dump(1) + "\n", 0600);
}

Status Wallet::journal_mark_done(const std::string& key) {
  if (journal_.empty()) return ok_status();
  SN_ASSIGN(auto entries, journal_read());
  if (!entries.contains(key)) return ok_status();
  if (key.starts_with("tx:")) {
    entries.erase(key);
  } else {
    entries[key].erase("raw");
    entries[key]["done"] = true;
  }
  return journal_write(entries);
}

Result<size_t> Wallet::finish_pending() {
  std::lock_guard lock(*mutex_);
  SN_ASSIGN(size_t finished, finish_pending_locked());
  recovered_ = true;
  next_nonce_.reset();
  return finished;
}

Result<size_t> Wallet::finish_pending_locked() {
  SN_ASSIGN(auto entries, journal_read());
  std::vector<std::pair<uint64_t, std::string>> pending;  // (nonce, key): re-sent in nonce order
  for (const auto& [key, entry] : entries.items())
    if (!entry.value("done", false)) pending.emplace_back(entry["nonce"].get<uint64_t>(), key);
  std::sort(pending.begin(), pending.end());
  std::vector<std::string> sent_keys;
  for (const auto& [nonce, key] : pending) {
    const std::string hash = entries[key]["hash"].get<std::string>();
    bool rejected = false;
    auto sent = rpc_->call("eth_sendRawTransaction", {entries[key]["raw"]}, &rejected);
    if (!sent.ok()) {
      SN_ASSIGN(auto mined, rpc_->call("eth_getTransactionReceipt", {hash}));
      if (mined.is_null() && rejected && nonce_too_low(sent.message())) {
        // Another transaction took this nonce (the key used elsewhere): this one can
        // never be mined, so its action did not happen; forget it.
        entries.erase(key);
        SN_TRY(journal_write(entries));
        continue;
      }
      if (mined.is_null() && !(rejected && already_known(sent.message())))
        return make_error("re-sending journaled transaction {} (nonce {}): {}", hash, nonce, sent.message());
    }
    sent_keys.push_back(key);
  }
  for (const auto& key : sent_keys) {
    SN_TRY(wait_mined(entries[key]["hash"].get<std::string>()));  // a mined failure still ends the action
    SN_TRY(journal_mark_done(key));
  }
  return sent_keys.size();
}

Result<Wallet::Sent> Wallet::sign_and_send(std::optional<Address> to, Wei value, const Bytes& data,
                                           std::string_view action) {
  nlohmann::json call = {{"from", address_hex(address())}, {"data", hex0x(data)},
                         {"value", "0x" + fmt::format("{:x}", static_cast<uint64_t>(value >> 64)) +
                                       fmt::format("{:016x}", static_cast<uint64_t>(value))}};
  if (to) call["to"] = address_hex(*to);
  SN_ASSIGN(auto gas_json, rpc_->call("eth_estimateGas", {call}));
  SN_ASSIGN(Wei gas_estimate, parse_quantity(gas_json, "gas estimate"));
  SN_ASSIGN(auto price_json, rpc_->call("eth_gasPrice", nlohmann::json::array()));
  SN_ASSIGN(Wei gas_price, parse_quantity(price_json, "gas price"));
  Wei gas_limit = gas_estimate + gas_estimate / 5 + 5000;  // headroom: state can move between estimate and mining
  Wei max_fee = gas_price * 2 + 1;
  Wei priority_fee = 1;

  std::lock_guard lock(*mutex_);
  if (!next_nonce_) {
    SN_ASSIGN(auto nonce_json, rpc_->call("eth_getTransactionCount", {address_hex(address()), "pending"}));
    SN_ASSIGN(uint64_t nonce, parse_quantity_u64(nonce_json, "nonce"));
    next_nonce_ = nonce;
  }
  const uint64_t nonce = *next_nonce_;
  Bytes to_bytes = to ? Bytes(to->begin(), to->end()) : Bytes{};
  std::vector<Bytes> fields = {rlp::encode_uint(chain_id_),     rlp::encode_uint(nonce),
                               rlp::encode_uint(priority_fee),  rlp::encode_uint(max_fee),
                               rlp::encode_uint(gas_limit),     rlp::encode_bytes(to_bytes),
                               rlp::encode_uint(value),         rlp::encode_bytes(data),
                               rlp::encode_list({})};
  Bytes unsigned_tx{0x02};
  auto body = rlp::encode_list(fields);
  unsigned_tx.insert(unsigned_tx.end(), body.begin(), body.end());
  auto signature = key_.sign(keccak256(unsigned_tx));
  auto strip = [](const std::array<uint8_t, 32>& word) {
    auto first = std::find_if(word.begin(), word.end(), [](uint8_t b) { return b != 0; });
    return Bytes(first, word.end());
  };
  fields.push_back(rlp::encode_uint(signature.y_parity));
  fields.push_back(rlp::encode_bytes(strip(signature.r)));
  fields.push_back(rlp::encode_bytes(strip(signature.s)));
  Bytes raw{0x02};
  body = rlp::encode_list(fields);
  raw.insert(raw.end(), body.begin(), body.end());
  const std::string hash = hex0x(keccak256(raw));
  const std::string key = journal_key(action, hash);
  nlohmann::json entries;
  if (!journal_.empty()) {
    SN_ASSIGN(entries, journal_read());
    entries[key] = {{"nonce", nonce}, {"hash", hash}, {"raw", hex0x(raw)}};
    SN_TRY(journal_write(entries));
  }
  if (hook_) hook_(Step::journaled, action);
  bool rejected = false;
  auto sent = rpc_->call("eth_sendRawTransaction", {hex0x(raw)}, &rejected);
  if (!sent.ok() && !(rejected && already_known(sent.message()))) {
    next_nonce_.reset();  // re-read from the chain: another process may have used it
    if (rejected) {  // refused outright: it will never be mined, nothing to finish later
      if (!journal_.empty()) {
        entries.erase(key);
        SN_TRY(journal_write(entries));
      }
      return Sent{.error = sent.message(), .rejected = true};
    }
    // No answer: the node may hold it. The journal keeps it; the next send re-sends it first.
    recovered_ = false;
    return Sent{.error = fmt::format("sending {}: {}", hash, sent.message())};
  }
  ++*next_nonce_;
  if (hook_) hook_(Step::sent, action);
  return Sent{.hash = hash, .key = key};
}

Result<nlohmann::json> Wallet::wait_mined(const std::string& hash) {
  for (int attempt = 0; attempt < 600; ++attempt) {
    SN_ASSIGN(auto json, rpc_->call("eth_getTransactionReceipt", {hash}));
    if (!json.is_null()) return json;
    usleep(attempt < 20 ? 5000 : 50000);
  }
  return make_error("transaction {} not mined after 30 s", hash);
}

Result<Receipt> Wallet::send(std::optional<Address> to, Wei value, const Bytes& data, std::string_view action) {
  if (!action.empty() && journal_.empty()) return make_error("a named action ('{}') needs a journal", action);
  std::optional<std::string> known_hash;
  {
    std::lock_guard lock(*mutex_);
    if (!recovered_) {  // finish what a killed predecessor left before any new nonce is handed out
      SN_TRY(finish_pending_locked());
      recovered_ = true;
      next_nonce_.reset();
    }
    if (!action.empty()) {
      SN_ASSIGN(auto entries, journal_read());
      if (auto it = entries.find(journal_key(action, "")); it != entries.end())
        known_hash = (*it)["hash"].get<std::string>();
    }
  }
  if (known_hash) {  // done before (or in flight on another thread): its receipt, not a repeat
    SN_ASSIGN(auto json, wait_mined(*known_hash));
    return parse_receipt(json);
  }
  SN_ASSIGN(Sent sent, sign_and_send(to, value, data, action));
  if (sent.rejected && sent.error.find("nonce") != std::string::npos) {
    SN_ASSIGN(sent, sign_and_send(to, value, data, action));
  }
  if (!sent.error.empty()) return make_error("{}", sent.error);
  auto mined = wait_mined(sent.hash);
  if (!mined.ok()) {
    std::lock_guard lock(*mutex_);
    recovered_ = false;  // still journaled: the next send waits for it first
    return mined.error();
  }
  if (hook_) hook_(Step::mined, action);
  {
    std::lock_guard lock(*mutex_);
    SN_TRY(journal_mark_done(sent.key));
  }
  return parse_receipt(*mined);
}

}  // namespace sn::chain
