// Topology files: which regions exist, how many nodes sit in each, and the
// latency and bandwidth of links inside a region and between regions.
// docs/topology.md describes the format. The same file feeds the link emulator
// (net) and the scheduler's cost model (sched).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/memory.h"
#include "core/result.h"

namespace sn {

// Input limits (docs/topology.md). They keep every derived figure finite: a 1 GB
// message on the slowest link takes 8·10^6 s, far inside the emulator's int64
// nanosecond clock (9.2·10^9 s), and n² links of kMaxDevices stay countable in
// int64 (whether they fit in memory is checked where they are allocated).
inline constexpr double kMaxLatencyMs = 100'000;       // 100 s one-way
inline constexpr double kMinBandwidthMbps = 1e-3;      // 1 kbit/s
inline constexpr double kMaxBandwidthMbps = 1e9;       // 1 Pbit/s (also a 1-node region's inside link)
inline constexpr int kMaxDevices = 10'000'000;         // device slots over all regions (memory is checked too)

struct LinkSpec {
  double latency_ms = 0;        // one-way
  double bandwidth_mbps = 0;    // megabits per second (1e6 bits/s)

  double bytes_per_second() const { return bandwidth_mbps * 1e6 / 8.0; }
  // Time for one message of BYTES on an idle link: serialization + latency.
  double transfer_seconds(double bytes) const {
    return bytes / bytes_per_second() + latency_ms / 1e3;
  }
};

struct Region {
  std::string name;
  int nodes = 0;                // device slots in this region
  LinkSpec inside;              // between two nodes of this region
  double compute_tflops = 1.0;  // per-device compute speed, for the scheduler
  double memory_gb = 16.0;      // per-device memory, for the scheduler
  int line = 0;
};

// How links are emulated (DESIGN.md, "Scaled links"): raw uses the file's
// figures; scaled stretches time by time_dilation T and bytes by byte_ratio R,
// so latency α becomes α·T and bandwidth β becomes β·R/T.
struct EmulationScale {
  double time_dilation = 1.0;
  double byte_ratio = 1.0;           // R of pipeline (activation) traffic: sets the link
  double gradient_byte_ratio = 0.0;  // R of data-parallel traffic; 0: same as byte_ratio

  // Data-parallel messages are charged as if R were byte_ratio, so each
  // traffic class takes the anchor's time for the anchor's size.
  double pacing_weight(bool data_parallel) const {
    if (!data_parallel || gradient_byte_ratio <= 0) return 1.0;
    return byte_ratio / gradient_byte_ratio;
  }

  LinkSpec apply(const LinkSpec& link) const {
    return LinkSpec{link.latency_ms * time_dilation,
                    link.bandwidth_mbps * byte_ratio / time_dilation};
  }
};

struct Topology {
  std::string name;
  std::string mode = "raw";             // "raw" or "scaled"
  std::string anchor;                   // scaled: the anchor setting (e.g. "gpt3-xl")
  std::vector<Region> regions;
  std::map<std::pair<int, int>, LinkSpec> between;  // key (a, b) with a < b

  int region_index(const std::string& name) const;  // -1 if unknown
  int device_count() const;
  // Region of each device, devices numbered region by region in file order.
  std::vector<int> device_regions() const;
  // The link between two regions (the same region: its inside link).
  LinkSpec link(int region_a, int region_b) const;
  // True if the two regions are the same (an "intra" link class).
  static bool same_region(int a, int b) { return a == b; }
};

Result<Topology> parse_topology_file(const std::filesystem::path& path);
Result<Topology> parse_topology_string(std::string_view text, const std::string& display_name);
std::string topology_to_toml(const Topology& topology);

// A full device-by-device matrix (for generated topologies in the scheduler).
struct LinkMatrix {
  int n = 0;
  std::vector<LinkSpec> links;  // n*n, row-major; diagonal unused
  std::vector<double> compute_tflops;
  std::vector<double> memory_gb;
  std::vector<int> region_of;   // device → region index (for reports)

  const LinkSpec& at(int a, int b) const { return links[static_cast<size_t>(a) * n + b]; }
  LinkSpec& at(int a, int b) { return links[static_cast<size_t>(a) * n + b]; }
};

// Bytes a LinkMatrix of DEVICES devices holds (n² links; what the scheduler adds is
// its own, see sched::plan_memory_bytes).
uint64_t link_matrix_bytes(int devices);

// Devices in the regions REGION_OF (indices into TOPOLOGY's regions), with
// every link as SCALE emulates it. Refuses (input error, nothing allocated) more
// than kMaxDevices devices or a matrix too large for this machine's memory.
Result<LinkMatrix> link_matrix_for(const Topology& topology, const std::vector<int>& region_of,
                                   const EmulationScale& scale = {});
// Every device slot of TOPOLOGY, region by region, raw links.
Result<LinkMatrix> to_link_matrix(const Topology& topology);

}  // namespace sn
