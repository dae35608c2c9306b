// Discovery over a Kademlia DHT (OpenDHT): nodes publish signed
// announcements under one key per network; readers verify each one, drop
// forgeries, and ignore announcements older than the staleness limit, so a
// node that stops drops out of the list (docs/discovery.md).
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/keys.h"
#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace dht {
class DhtRunner;
}

namespace sn::net {

struct DiscoveryOptions {
  std::string network = "solvernet";                     // separate networks never mix
  std::chrono::milliseconds republish_every{5000};
  std::chrono::milliseconds stale_after{20000};
};

class Discovery {
 public:
  // Runs a DHT node on UDP DHT_PORT (0: any free) and joins via BOOTSTRAP
  // ("host:port" each; empty: this is the first node).
  static Result<std::unique_ptr<Discovery>> start(uint16_t dht_port, const std::vector<std::string>& bootstrap,
                                                  DiscoveryOptions options = {});
  static Result<std::unique_ptr<Discovery>> start(uint16_t dht_port, const std::vector<std::string>& bootstrap,
                                                  const std::string& network);
  ~Discovery();

  // Publishes INFO now and again every republish_every, freshly stamped and
  // signed, until stop().
  void announce(const solvernet::v1::NodeInfo& info, const NodeKey& key);
  void update_announcement(const solvernet::v1::NodeInfo& info);
  // Verified live nodes, one per id (newest wins), waiting up to TIMEOUT for the DHT.
  Result<std::vector<solvernet::v1::NodeInfo>> list_nodes(std::chrono::milliseconds timeout);
  // Asks repeatedly until at least N live nodes are listed or TIMEOUT passes;
  // returns the largest list seen (possibly fewer than N: the caller decides).
  Result<std::vector<solvernet::v1::NodeInfo>> wait_for_nodes(size_t n, std::chrono::milliseconds timeout);
  // Publishes raw bytes under the network's key (tests use it to plant forgeries).
  void put_raw(const std::string& bytes, uint64_t value_id);
  uint16_t port() const;
  // Stops re-publishing, replaces this node's announcement with an empty
  // tombstone (so readers drop it at once rather than after stale_after) and
  // shuts the DHT node down. Idempotent; the destructor calls it.
  void stop();

 private:
  Discovery() = default;
  void publish_locked();

  DiscoveryOptions options_;
  std::unique_ptr<dht::DhtRunner> runner_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::optional<solvernet::v1::NodeInfo> info_;
  const NodeKey* key_ = nullptr;
  std::thread republisher_;
};

}  // namespace sn::net
