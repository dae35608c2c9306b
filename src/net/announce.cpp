#include "net/announce.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace sn::net {

int64_t unix_millis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

solvernet::v1::SignedNodeInfo sign_node_info(const solvernet::v1::NodeInfo& info, const NodeKey& key) {
  solvernet::v1::SignedNodeInfo out;
  std::string bytes;
  info.SerializeToString(&bytes);
  Signature sig = key.sign(sn::as_bytes(bytes));
  out.set_info(bytes);
  out.set_signature(sig.data(), sig.size());
  return out;
}

Result<solvernet::v1::NodeInfo> verify_node_info(const solvernet::v1::SignedNodeInfo& signed_info) {
  solvernet::v1::NodeInfo info;
  if (!info.ParseFromString(signed_info.info())) return make_error("announcement is not a valid NodeInfo");
  if (signed_info.signature().size() != 64)
    return make_error("announcement of node {} has a {}-byte signature, expected 64", info.node_id().substr(0, 16),
                      signed_info.signature().size());
  if (info.public_key().size() != 32)
    return make_error("announcement of node {} has a {}-byte public key", info.node_id().substr(0, 16),
                      info.public_key().size());
  PublicKey key;
  std::memcpy(key.data(), info.public_key().data(), 32);
  if (node_id_of(key) != info.node_id())
    return make_error("announcement claims node id {} but its key hashes to {}", info.node_id().substr(0, 16),
                      node_id_of(key).substr(0, 16));
  if (!verify_signature(key, sn::as_bytes(signed_info.info()),
                        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(signed_info.signature().data()),
                                                 signed_info.signature().size())))
    return make_error("announcement of node {} has a bad signature", info.node_id().substr(0, 16));
  return info;
}

solvernet::v1::NodeInfo tombstone_info(const NodeKey& key, int64_t timestamp_ms) {
  solvernet::v1::NodeInfo info;
  info.set_node_id(key.node_id());
  info.set_public_key(key.public_key().data(), key.public_key().size());
  info.set_timestamp_ms(timestamp_ms);
  info.set_withdrawn(true);
  return info;
}

solvernet::v1::SignedNodeInfo sign_tombstone(const NodeKey& key, int64_t timestamp_ms) {
  return sign_node_info(tombstone_info(key, timestamp_ms), key);
}

uint64_t announcement_value_id(const std::string& node_id) {
  uint64_t id = 0;
  for (size_t i = 0; i < 16 && i < node_id.size(); ++i) {
    char c = node_id[i];
    id = (id << 4) | static_cast<uint64_t>(c >= 'a' ? c - 'a' + 10 : c - '0');
  }
  return id;
}

Result<solvernet::v1::NodeInfo> check_announcement(std::string_view bytes, uint64_t value_id) {
  solvernet::v1::SignedNodeInfo signed_info;
  if (bytes.empty()) return kind_error(ErrorKind::bad_peer, "an empty value is not a signed announcement");
  if (!signed_info.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())))
    return kind_error(ErrorKind::bad_peer, "value is not a SignedNodeInfo");
  auto info = verify_node_info(signed_info);
  if (!info.ok()) return kind_error(ErrorKind::bad_peer, "{}", info.message());
  if (announcement_value_id(info->node_id()) != value_id)
    return kind_error(ErrorKind::bad_peer, "announcement of node {} under value id {:016x}, not its own {:016x}",
                      info->node_id().substr(0, 16), value_id, announcement_value_id(info->node_id()));
  return info;
}

Status check_replacement(std::string_view current, std::string_view replacement, uint64_t value_id) {
  SN_ASSIGN(auto next, check_announcement(replacement, value_id));
  auto stored = check_announcement(current, value_id);
  if (!stored.ok()) return ok_status();  // nothing genuine to protect
  if (stored->node_id() != next.node_id())
    return kind_error(ErrorKind::bad_peer, "node {} may not replace the announcement of node {}",
                      next.node_id().substr(0, 16), stored->node_id().substr(0, 16));
  if (next.timestamp_ms() <= stored->timestamp_ms())
    return kind_error(ErrorKind::bad_peer, "announcement of node {} stamped {} is not newer than the stored {}",
                      next.node_id().substr(0, 16), next.timestamp_ms(), stored->timestamp_ms());
  return ok_status();
}

double measure_compute_gflops() {
  const int n = 64;
  std::vector<float> a(n * n, 1.001f), b(n * n, 0.999f), c(n * n, 0.0f);
  auto start = std::chrono::steady_clock::now();
  int64_t flops = 0;
  while (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(200)) {
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < n; ++k) {
        float aik = a[i * n + k];
        for (int j = 0; j < n; ++j) c[i * n + j] += aik * b[k * n + j];
      }
    flops += int64_t(2) * n * n * n;
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float sink = c[0];
  (void)sink;
  return static_cast<double>(flops) / seconds / 1e9;
}

solvernet::v1::NodeInfo local_node_info(const NodeKey& key, const std::string& region) {
  solvernet::v1::NodeInfo info;
  info.set_node_id(key.node_id());
  info.set_public_key(key.public_key().data(), key.public_key().size());
  info.set_region(region);
  info.set_cores(static_cast<int32_t>(std::thread::hardware_concurrency()));
  long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  info.set_memory_bytes(pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0);
  info.set_compute_gflops(measure_compute_gflops());
  info.set_timestamp_ms(unix_millis());
  info.set_version("0.1.0");
  return info;
}

}  // namespace sn::net
