// Discovery over a Kademlia DHT (OpenDHT): nodes publish signed
// announcements under one key per network. Every node's store/edit policy
// lets only the announcing key replace or withdraw (signed tombstone) its
// value, and only with a newer one; readers verify each value again, keep the
// newest per node, drop withdrawn ones and ignore announcements older than the
// staleness limit, so a node that stops drops out of the list (docs/discovery.md).
#pragma once

#include <chrono>
#include <atomic>
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
  // While joined, the bootstrap is pinged again this often (± 20 %): a
  // restarted bootstrap knows no one, and the nodes that still reach one
  // another would never ask it again, leaving the DHT split in two.
  std::chrono::milliseconds bootstrap_refresh{10000};
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

  // Whether a bootstrap answered: ok at once if none was given (the first node)
  // or some DHT peer is known; else waits up to TIMEOUT. Errors: invalid_input
  // if no bootstrap host resolves ("… does not resolve"), unavailable if none
  // answered ("… did not answer within … ms"). Nothing is changed: the DHT
  // keeps trying in the background, but the warnings announce() would log
  // while no bootstrap answers are left to the caller.
  Status wait_for_bootstrap(std::chrono::milliseconds timeout);
  // Whether this node knows at least one other DHT node that answered.
  bool connected() const;

  // Publishes INFO now and again every republish_every, freshly stamped and
  // signed, until stop(). A put that no DHT node acknowledged is retried
  // after 1 s, doubling up to 30 s (± 20 %), until one succeeds; meanwhile
  // update_announcement only swaps the content, which the retry carries. A
  // run of failed puts logs one warning, and one line when a put succeeds
  // again. While no DHT node answers, the bootstrap is asked again at
  // doubling pauses up to 5 s, and the node logs one warning when the DHT
  // becomes unreachable (after 3 s at the start) and one line when it
  // answers again, not one per attempt. (The bootstrap is pinged every
  // bootstrap_refresh even while joined, announcing or not.)
  void announce(const solvernet::v1::NodeInfo& info, const NodeKey& key);
  void update_announcement(const solvernet::v1::NodeInfo& info);
  // Verified live nodes, one per id (newest wins), waiting up to TIMEOUT for the DHT.
  Result<std::vector<solvernet::v1::NodeInfo>> list_nodes(std::chrono::milliseconds timeout);
  // Asks repeatedly until at least N live nodes are listed or TIMEOUT passes;
  // returns the largest list seen (possibly fewer than N: the caller decides).
  Result<std::vector<solvernet::v1::NodeInfo>> wait_for_nodes(size_t n, std::chrono::milliseconds timeout);
  // Publishes raw bytes under the network's key (tests use it to plant forgeries).
  void put_raw(const std::string& bytes, uint64_t value_id);
  // Every value under the network's key as (value id, bytes), unverified,
  // waiting up to TIMEOUT (tests use it to capture announcements to replay).
  Result<std::vector<std::pair<uint64_t, std::string>>> get_raw(std::chrono::milliseconds timeout);
  uint16_t port() const;
  // Stops re-publishing, replaces this node's announcement with a signed
  // tombstone (so readers drop it at once rather than after stale_after) and
  // shuts the DHT node down. Idempotent; the destructor calls it.
  void stop();

 private:
  Discovery() = default;
  void republish_loop();  // the republisher thread
  void publish_locked();
  // Logs a change between reaching the DHT (JOINED) and not, once per change.
  void report_reachability_locked(bool joined, bool was_joined);
  void ping_bootstrap();  // each bootstrap address, now (not under mutex_)

  DiscoveryOptions options_;
  std::unique_ptr<dht::DhtRunner> runner_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::optional<solvernet::v1::NodeInfo> info_;
  const NodeKey* key_ = nullptr;
  int64_t last_timestamp_ms_ = 0;
  std::optional<std::chrono::steady_clock::time_point> last_publish_;
  std::optional<std::chrono::steady_clock::time_point> put_retry_at_;  // set while puts fail
  std::vector<std::pair<std::string, std::string>> bootstrap_;  // host, port
  std::chrono::steady_clock::time_point started_;
  bool unreachable_reported_ = false, ever_joined_ = false;
  std::atomic<bool> caller_watches_bootstrap_{false};
  std::atomic<bool> put_failed_{false}, put_stored_{false};  // set by put callbacks, read by the republisher
  std::atomic<int> failed_puts_{0};
  std::atomic<uint64_t> put_sequence_{0};  // puts made; a callback knows whether a newer one followed
  std::thread republisher_;
};

}  // namespace sn::net
