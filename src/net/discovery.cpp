#include "net/discovery.h"

#include <opendht.h>
#include <spdlog/spdlog.h>

#include <netdb.h>
#include <sys/socket.h>

#include <future>
#include <algorithm>
#include <map>
#include <thread>

#include "core/backoff.h"
#include "net/announce.h"
#include "net/rpc.h"

namespace sn::net {
namespace {

constexpr dht::ValueType::Id kNodeValueType = 0x5301;

// Announcements are replaced in place (same value id per node) and expire on
// their own soon after a node stops re-publishing. Every solvernet DHT node
// registers this type, so the nodes that store an announcement accept it only
// if it verifies under its signer's value id, and let only a newer value signed
// by the same node replace it: a forged value, a forged tombstone or a replayed
// old announcement is refused where it would be stored. Readers check again.
dht::ValueType node_value_type() {
  auto as_view = [](const dht::Value& value) {
    return std::string_view(reinterpret_cast<const char*>(value.data.data()), value.data.size());
  };
  return dht::ValueType(
      kNodeValueType, "solvernet-node", std::chrono::seconds(30),
      [as_view](dht::InfoHash, std::shared_ptr<dht::Value>& value, const dht::InfoHash&, const dht::SockAddr& from) {
        if (!value || value->data.size() > 4096) return false;
        auto checked = check_announcement(as_view(*value), value->id);
        if (!checked.ok()) spdlog::debug("DHT: refused to store a value from {}: {}", from.toString(), checked.message());
        return checked.ok();
      },
      [as_view](dht::InfoHash, const std::shared_ptr<dht::Value>& current, std::shared_ptr<dht::Value>& value,
                const dht::InfoHash&, const dht::SockAddr& from) {
        if (!value || !current || value->data.size() > 4096) return false;
        auto checked = check_replacement(as_view(*current), as_view(*value), value->id);
        if (!checked.ok()) spdlog::debug("DHT: refused an edit from {}: {}", from.toString(), checked.message());
        return checked.ok();
      });
}

dht::InfoHash network_key(const std::string& network) { return dht::InfoHash::get("solvernet:" + network + ":nodes"); }

// Same on every platform and build (unlike std::hash), so machines built
// separately still find each other. Never 0, the public OpenDHT network.
dht::NetId network_id(const std::string& network) {
  const dht::InfoHash h = dht::InfoHash::get("solvernet-netid:" + network);
  dht::NetId id = (dht::NetId(h[0]) << 24) | (dht::NetId(h[1]) << 16) | (dht::NetId(h[2]) << 8) | dht::NetId(h[3]);
  return (id & 0x7fffffff) | 1;
}

// Whether HOST resolves to an address (IPv4 or IPv6).
bool resolves(const std::string& host) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (found) ::freeaddrinfo(found);
  return rc == 0;
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
    d->bootstrap_.emplace_back(hp.first, std::to_string(hp.second));
    d->runner_->bootstrap(hp.first, std::to_string(hp.second));
  }
  d->started_ = std::chrono::steady_clock::now();
  d->republisher_ = std::thread([raw = d.get()] { raw->republish_loop(); });
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
  std::optional<solvernet::v1::SignedNodeInfo> tombstone;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
    // Withdraw with a signed tombstone, newer than every announcement we made,
    // so storing nodes accept it as an edit and readers drop us at once.
    if (info_ && key_) tombstone = sign_tombstone(*key_, std::max(unix_millis(), last_timestamp_ms_ + 1));
  }
  wake_.notify_all();
  if (republisher_.joinable()) republisher_.join();
  if (runner_ && tombstone) {
    std::string bytes = tombstone->SerializeAsString();
    auto value = std::make_shared<dht::Value>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    value->id = announcement_value_id(info_->node_id());
    value->type = kNodeValueType;
    auto stored = std::make_shared<std::promise<bool>>();
    runner_->put(network_key(options_.network), value, [stored](bool ok) { stored->set_value(ok); });
    auto done = stored->get_future();  // best effort, bounded wait
    if (done.wait_for(std::chrono::milliseconds(1500)) != std::future_status::ready || !done.get())
      spdlog::warn("the withdrawal of this node's announcement was not acknowledged; it goes stale in {} s",
                   options_.stale_after.count() / 1000);
  }
  if (runner_) {
    runner_->shutdown({}, true);
    runner_->join();
  }
}

uint16_t Discovery::port() const { return runner_->getBoundPort(); }

void Discovery::ping_bootstrap() {
  // OpenDHT pings a bootstrap once and then only every 10 s while
  // disconnected: one lost first ping (seen on a busy devnet) kept a
  // restarted node out of the DHT, and so out of a recovery, for 10 s.
  for (const auto& [host, port] : bootstrap_) {
    std::vector<dht::SockAddr> addresses;
    try {
      addresses = dht::SockAddr::resolve(host, port);
    } catch (const std::exception&) {
      continue;  // report_reachability_locked says it does not resolve
    }
    if (!addresses.empty()) runner_->bootstrap(std::move(addresses));
  }
}

bool Discovery::connected() const {
  return runner_->getNodesStats(AF_INET).good_nodes + runner_->getNodesStats(AF_INET6).good_nodes > 0;
}

Status Discovery::wait_for_bootstrap(std::chrono::milliseconds timeout) {
  caller_watches_bootstrap_.store(true);  // the caller reports; no background warnings
  if (bootstrap_.empty()) return ok_status();
  std::vector<std::string> unresolved;
  for (const auto& [host, port] : bootstrap_)
    if (!resolves(host)) unresolved.push_back(host + ":" + port);
  if (unresolved.size() == bootstrap_.size())
    return input_error("the bootstrap host {} does not resolve", unresolved.front());
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  Backoff ping_again(std::chrono::milliseconds(500), std::chrono::milliseconds(2000));
  auto next_ping = std::chrono::steady_clock::now() + ping_again.next();
  while (!connected()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string names;
      for (const auto& [host, port] : bootstrap_) names += (names.empty() ? "" : ", ") + host + ":" + port;
      return kind_error(ErrorKind::unavailable, "the bootstrap {} did not answer within {} ms (is a node or `solvernet dht` running there?)",
                        names, timeout.count());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (std::chrono::steady_clock::now() >= next_ping) {
      ping_bootstrap();
      next_ping = std::chrono::steady_clock::now() + ping_again.next();
    }
  }
  return ok_status();
}

void Discovery::republish_loop() {
  using Clock = std::chrono::steady_clock;
  // While no DHT node answers, the bootstrap is asked again after 0.2 s,
  // then at doubling pauses up to 5 s: OpenDHT itself retries only every
  // 10 s, and one lost first ping kept a restarted node out of the DHT (and
  // out of the recovery waiting for it) for 10 s. A put no DHT node stored
  // is retried after 1 s, doubling up to 30 s: retried at once, a dead
  // bootstrap made it 993 puts in 2.2 s.
  Backoff rejoin(std::chrono::milliseconds(200), std::chrono::milliseconds(5000));
  Backoff put_retry(std::chrono::milliseconds(1000), std::chrono::milliseconds(30000));
  // Joined, the bootstrap is still pinged every bootstrap_refresh: nodes that
  // reach one another stay joined when the bootstrap restarts empty, and
  // without a ping from them it never learns of them (the nodes that join
  // through it then form a second DHT). One ping per bootstrap is cheap; the
  // jitter keeps a network's nodes from pinging it in step.
  Backoff refresh(options_.bootstrap_refresh, options_.bootstrap_refresh);
  std::unique_lock<std::mutex> lock(mutex_);
  bool joined = connected();
  auto next_ping = Clock::now() + rejoin.next();
  auto next_refresh = Clock::now() + refresh.next();
  while (!stopping_) {
    auto wake = Clock::now() + std::chrono::milliseconds(1000);
    if (!joined) wake = std::min(wake, next_ping);
    if (info_ && put_retry_at_) wake = std::min(wake, *put_retry_at_);
    if (info_ && !put_retry_at_ && last_publish_) wake = std::min(wake, *last_publish_ + options_.republish_every);
    wake_.wait_until(lock, wake);
    if (stopping_) break;
    const bool was_joined = joined;
    joined = connected();
    if (joined) {
      rejoin.reset();
      if (!bootstrap_.empty() && Clock::now() >= next_refresh) {
        lock.unlock();
        ping_bootstrap();
        lock.lock();
        if (stopping_) break;
        next_refresh = Clock::now() + refresh.next();
      }
    } else if (was_joined) {
      next_ping = Clock::now() + rejoin.next();
    } else if (Clock::now() >= next_ping) {
      lock.unlock();  // resolving a host name may take a while
      ping_bootstrap();
      lock.lock();
      if (stopping_) break;
      next_ping = Clock::now() + rejoin.next();
    }
    report_reachability_locked(joined, was_joined);
    // One stored put is enough: a failure of another put in flight with it is moot.
    if (put_stored_.exchange(false)) {
      put_failed_.store(false);
      put_retry.reset();
      put_retry_at_.reset();
    } else if (put_failed_.exchange(false)) {
      put_retry_at_ = Clock::now() + put_retry.next();
    }
    if (!info_) continue;
    const auto now = Clock::now();
    // Just joined: publish now, since a put made before had no node to store
    // it (but at most every 0.2 s, however often the join flaps).
    if (joined && !was_joined)
      put_retry_at_ = last_publish_ ? std::max(now, *last_publish_ + std::chrono::milliseconds(200)) : now;
    const bool due = !last_publish_ ||
                     (put_retry_at_ ? now >= *put_retry_at_ : now - *last_publish_ >= options_.republish_every);
    if (due) publish_locked();
  }
}

void Discovery::report_reachability_locked(bool joined, bool was_joined) {
  if (bootstrap_.empty() || caller_watches_bootstrap_.load()) return;
  if (joined) {
    if (unreachable_reported_) spdlog::info("the DHT answers again");
    unreachable_reported_ = false;
    ever_joined_ = true;
    return;
  }
  // A bootstrap gets 3 s to answer at the start; a DHT lost later is reported at once.
  if (unreachable_reported_ || (!ever_joined_ && std::chrono::steady_clock::now() < started_ + std::chrono::seconds(3)))
    return;
  std::string names;
  for (const auto& [host, port] : bootstrap_) names += (names.empty() ? "" : ", ") + host + ":" + port;
  const bool none_resolves =
      std::all_of(bootstrap_.begin(), bootstrap_.end(), [](const auto& b) { return !resolves(b.first); });
  spdlog::warn("{} (bootstrap {}{}); asking again, at most 5 s apart, until one answers",
               ever_joined_ || was_joined ? "lost the DHT: no DHT node answers any more" : "no DHT node has answered yet",
               names, none_resolves ? ", which does not resolve" : "");
  unreachable_reported_ = true;
}

void Discovery::publish_locked() {
  if (!info_ || !key_) return;
  // Strictly increasing stamps: the DHT's edit policy accepts only newer values.
  last_timestamp_ms_ = std::max(unix_millis(), last_timestamp_ms_ + 1);
  info_->set_timestamp_ms(last_timestamp_ms_);
  last_publish_ = std::chrono::steady_clock::now();
  put_retry_at_.reset();
  spdlog::debug("DHT put of this node's announcement, stamped {}", last_timestamp_ms_);
  std::string bytes;
  sign_node_info(*info_, *key_).SerializeToString(&bytes);
  auto value = std::make_shared<dht::Value>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  value->id = announcement_value_id(info_->node_id());
  value->type = kNodeValueType;
  // Runs on the DHT's thread (or at once, under mutex_, if the runner has
  // stopped), so it takes no lock; the runner is joined in stop() before we go.
  // A put that a newer one replaced before it was stored reports a failure
  // that is none: only the newest put's failure counts.
  const uint64_t sequence = ++put_sequence_;
  runner_->put(network_key(options_.network), value, [this, sequence](bool ok) {
    if (!ok && sequence != put_sequence_.load()) return;
    if (ok) {
      if (int failed = failed_puts_.exchange(0); failed > 0)
        spdlog::info("announcement stored after {} failed attempt(s)", failed);
      put_stored_.store(true);
    } else {
      if (failed_puts_.fetch_add(1) == 0)
        spdlog::warn("publishing this node's announcement failed (no DHT node stored it); retrying after 1 s, "
                     "doubling up to 30 s");
      put_failed_.store(true);
    }
    wake_.notify_all();
  });
}

void Discovery::announce(const solvernet::v1::NodeInfo& info, const NodeKey& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  info_ = info;
  key_ = &key;
  if (!put_retry_at_) publish_locked();
}

void Discovery::update_announcement(const solvernet::v1::NodeInfo& info) {
  std::lock_guard<std::mutex> lock(mutex_);
  info_ = info;
  // After a failed put the change waits for the retry (which carries it):
  // updates (probe rounds, jobs) must not undo the backoff.
  if (!put_retry_at_) publish_locked();
}

void Discovery::put_raw(const std::string& bytes, uint64_t value_id) {
  auto value = std::make_shared<dht::Value>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  value->id = value_id;
  value->type = kNodeValueType;
  runner_->put(network_key(options_.network), value, [](bool) {});
}

Result<std::vector<std::pair<uint64_t, std::string>>> Discovery::get_raw(std::chrono::milliseconds timeout) {
  auto done = std::make_shared<std::promise<void>>();
  auto values = std::make_shared<std::vector<std::pair<uint64_t, std::string>>>();
  auto values_mutex = std::make_shared<std::mutex>();
  runner_->get(
      network_key(options_.network),
      [values, values_mutex](const std::vector<std::shared_ptr<dht::Value>>& found) {
        std::lock_guard<std::mutex> lock(*values_mutex);
        for (const auto& v : found) values->emplace_back(v->id, std::string(v->data.begin(), v->data.end()));
        return true;
      },
      [done](bool) { done->set_value(); });
  done->get_future().wait_for(timeout);
  std::lock_guard<std::mutex> lock(*values_mutex);
  return *values;
}

Result<std::vector<solvernet::v1::NodeInfo>> Discovery::list_nodes(std::chrono::milliseconds timeout) {
  SN_ASSIGN(auto raw, get_raw(timeout));
  // The newest verified value per node decides, announcement or tombstone: a
  // replayed older announcement loses to the current one, a forged value or
  // tombstone does not verify, and a genuine tombstone removes the node.
  std::map<std::string, solvernet::v1::NodeInfo> newest;
  const int64_t now = unix_millis();
  for (const auto& [value_id, bytes] : raw) {
    if (bytes.empty()) continue;  // an unsigned tombstone (older nodes): means nothing
    auto info = check_announcement(bytes, value_id);
    if (!info.ok()) {
      spdlog::warn("dropped a forged or tampered announcement: {}", info.message());
      continue;
    }
    auto it = newest.find(info->node_id());
    if (it == newest.end() || it->second.timestamp_ms() < info->timestamp_ms()) newest[info->node_id()] = *info;
  }
  std::vector<solvernet::v1::NodeInfo> out;
  for (auto& [id, info] : newest)
    if (!info.withdrawn() && now - info.timestamp_ms() <= options_.stale_after.count()) out.push_back(info);
  return out;
}

Result<std::vector<solvernet::v1::NodeInfo>> Discovery::wait_for_nodes(size_t n, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<solvernet::v1::NodeInfo> best;
  Backoff pause(std::chrono::milliseconds(200), std::chrono::milliseconds(1000));
  while (true) {
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (remaining.count() <= 0) break;
    SN_ASSIGN(auto nodes, list_nodes(std::min(remaining, std::chrono::milliseconds(1000))));
    if (nodes.size() >= best.size()) best = std::move(nodes);
    if (best.size() >= n) break;
    // A fresh node is still filling its routing table: give it a moment.
    std::this_thread::sleep_for(std::min(pause.next(), remaining));
  }
  return best;
}

}  // namespace sn::net
