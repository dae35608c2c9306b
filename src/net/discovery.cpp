#include "net/discovery.h"

#include <opendht.h>
#include <spdlog/spdlog.h>

#include <future>
#include <algorithm>
#include <map>
#include <thread>

#include "net/announce.h"
#include "net/rpc.h"

namespace sn::net {
namespace {

constexpr dht::ValueType::Id kNodeValueType = 0x5301;

// Announcements are replaced in place (same value id per node) and expire on
// their own soon after a node stops re-publishing. Signatures are ours, checked
// by readers, so the DHT may accept any edit.
dht::ValueType node_value_type() {
  return dht::ValueType(
      kNodeValueType, "solvernet-node", std::chrono::seconds(30),
      [](dht::InfoHash, std::shared_ptr<dht::Value>& value, const dht::InfoHash&, const dht::SockAddr&) {
        return value && value->data.size() <= 4096;
      },
      [](dht::InfoHash, const std::shared_ptr<dht::Value>&, std::shared_ptr<dht::Value>& value, const dht::InfoHash&,
         const dht::SockAddr&) { return value && value->data.size() <= 4096; });
}

dht::InfoHash network_key(const std::string& network) { return dht::InfoHash::get("solvernet:" + network + ":nodes"); }

// Same on every platform and build (unlike std::hash), so machines built
// separately still find each other. Never 0, the public OpenDHT network.
dht::NetId network_id(const std::string& network) {
  const dht::InfoHash h = dht::InfoHash::get("solvernet-netid:" + network);
  dht::NetId id = (dht::NetId(h[0]) << 24) | (dht::NetId(h[1]) << 16) | (dht::NetId(h[2]) << 8) | dht::NetId(h[3]);
  return (id & 0x7fffffff) | 1;
}

uint64_t value_id_for(const std::string& node_id) {
  uint64_t id = 0;
  for (size_t i = 0; i < 16 && i < node_id.size(); ++i) {
    char c = node_id[i];
    id = (id << 4) | static_cast<uint64_t>(c >= 'a' ? c - 'a' + 10 : c - '0');
  }
  return id;
}

}  // namespace

Result<std::unique_ptr<Discovery>> Discovery::start(uint16_t dht_port, const std::vector<std::string>& bootstrap,
                                                    DiscoveryOptions options) {
  std::unique_ptr<Discovery> d(new Discovery());
  d->options_ = options;
  for (const auto& b : bootstrap) SN_TRY(split_host_port(b));
  d->runner_ = std::make_unique<dht::DhtRunner>();
  dht::DhtRunner::Config config;
  config.threaded = true;
  // A private network id: our nodes never join (or flood) the public OpenDHT network.
  config.dht_config.node_config.network = network_id(options.network);
  config.dht_config.node_config.maintain_storage = false;
  try {
    d->runner_->run(dht_port, config);
  } catch (const std::exception& e) {
    return input_error("cannot start the DHT on UDP port {}: {}", dht_port, e.what());
  }
  if (d->runner_->getBoundPort() == 0) return input_error("cannot start the DHT on UDP port {}: port in use", dht_port);
  d->runner_->registerType(node_value_type());
  for (const auto& b : bootstrap) {
    auto hp = split_host_port(b).value();
    d->runner_->bootstrap(hp.first, std::to_string(hp.second));
  }
  d->republisher_ = std::thread([raw = d.get()] {
    std::unique_lock<std::mutex> lock(raw->mutex_);
    while (!raw->stopping_) {
      raw->wake_.wait_for(lock, raw->options_.republish_every);
      if (raw->stopping_) break;
      raw->publish_locked();
    }
  });
  return d;
}

Result<std::unique_ptr<Discovery>> Discovery::start(uint16_t dht_port, const std::vector<std::string>& bootstrap,
                                                    const std::string& network) {
  DiscoveryOptions options;
  options.network = network;
  return start(dht_port, bootstrap, options);
}

Discovery::~Discovery() { stop(); }

void Discovery::stop() {
  std::optional<std::string> announced_id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
    if (info_ && key_) announced_id = info_->node_id();
  }
  wake_.notify_all();
  if (republisher_.joinable()) republisher_.join();
  if (runner_ && announced_id) {
    // Withdraw: an empty value under our value id replaces the announcement
    // on the nodes that store it. Best effort, bounded wait.
    auto tombstone = std::make_shared<dht::Value>();
    tombstone->id = value_id_for(*announced_id);
    tombstone->type = kNodeValueType;
    auto stored = std::make_shared<std::promise<void>>();
    runner_->put(network_key(options_.network), tombstone, [stored](bool) { stored->set_value(); });
    stored->get_future().wait_for(std::chrono::milliseconds(1500));
  }
  if (runner_) {
    runner_->shutdown({}, true);
    runner_->join();
  }
}

uint16_t Discovery::port() const { return runner_->getBoundPort(); }

void Discovery::publish_locked() {
  if (!info_ || !key_) return;
  info_->set_timestamp_ms(unix_millis());
  std::string bytes;
  sign_node_info(*info_, *key_).SerializeToString(&bytes);
  auto value = std::make_shared<dht::Value>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  value->id = value_id_for(info_->node_id());
  value->type = kNodeValueType;
  runner_->put(network_key(options_.network), value, [](bool) {});
}

void Discovery::announce(const solvernet::v1::NodeInfo& info, const NodeKey& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  info_ = info;
  key_ = &key;
  publish_locked();
}

void Discovery::update_announcement(const solvernet::v1::NodeInfo& info) {
  std::lock_guard<std::mutex> lock(mutex_);
  info_ = info;
  publish_locked();
}

void Discovery::put_raw(const std::string& bytes, uint64_t value_id) {
  auto value = std::make_shared<dht::Value>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  value->id = value_id;
  value->type = kNodeValueType;
  runner_->put(network_key(options_.network), value, [](bool) {});
}

Result<std::vector<solvernet::v1::NodeInfo>> Discovery::list_nodes(std::chrono::milliseconds timeout) {
  auto done = std::make_shared<std::promise<void>>();
  auto values = std::make_shared<std::vector<std::string>>();
  auto values_mutex = std::make_shared<std::mutex>();
  runner_->get(
      network_key(options_.network),
      [values, values_mutex](const std::vector<std::shared_ptr<dht::Value>>& found) {
        std::lock_guard<std::mutex> lock(*values_mutex);
        for (const auto& v : found) values->emplace_back(v->data.begin(), v->data.end());
        return true;
      },
      [done](bool) { done->set_value(); });
  done->get_future().wait_for(timeout);
  std::vector<std::string> raw;
  {
    std::lock_guard<std::mutex> lock(*values_mutex);
    raw = *values;
  }
  std::map<std::string, solvernet::v1::NodeInfo> newest;
  const int64_t now = unix_millis();
  for (const auto& bytes : raw) {
    if (bytes.empty()) continue;  // a withdrawn announcement (tombstone)
    solvernet::v1::SignedNodeInfo signed_info;
    if (!signed_info.ParseFromString(bytes)) {
      spdlog::warn("dropped an announcement that is not a SignedNodeInfo");
      continue;
    }
    auto info = verify_node_info(signed_info);
    if (!info.ok()) {
      spdlog::warn("dropped a forged or tampered announcement: {}", info.message());
      continue;
    }
    if (now - info->timestamp_ms() > options_.stale_after.count()) continue;
    auto it = newest.find(info->node_id());
    if (it == newest.end() || it->second.timestamp_ms() < info->timestamp_ms()) newest[info->node_id()] = *info;
  }
  std::vector<solvernet::v1::NodeInfo> out;
  for (auto& [id, info] : newest) out.push_back(info);
  return out;
}

Result<std::vector<solvernet::v1::NodeInfo>> Discovery::wait_for_nodes(size_t n, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<solvernet::v1::NodeInfo> best;
  while (true) {
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (remaining.count() <= 0) break;
    SN_ASSIGN(auto nodes, list_nodes(std::min(remaining, std::chrono::milliseconds(1000))));
    if (nodes.size() >= best.size()) best = std::move(nodes);
    if (best.size() >= n) break;
    // A fresh node is still filling its routing table: give it a moment.
    std::this_thread::sleep_for(std::min(std::chrono::milliseconds(200), remaining));
  }
  return best;
}

}  // namespace sn::net
