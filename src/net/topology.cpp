#include "net/topology.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/toml_reader.h"

namespace sn {

int Topology::region_index(const std::string& name) const {
  for (size_t i = 0; i < regions.size(); ++i)
    if (regions[i].name == name) return static_cast<int>(i);
  return -1;
}

int Topology::device_count() const {
  int n = 0;
  for (const auto& r : regions) n += r.nodes;
  return n;
}

std::vector<int> Topology::device_regions() const {
  std::vector<int> out;
  for (size_t i = 0; i < regions.size(); ++i)
    for (int k = 0; k < regions[i].nodes; ++k) out.push_back(static_cast<int>(i));
  return out;
}

LinkSpec Topology::link(int a, int b) const {
  if (a == b) return regions.at(static_cast<size_t>(a)).inside;
  auto key = a < b ? std::make_pair(a, b) : std::make_pair(b, a);
  return between.at(key);
}

static LinkSpec read_link(TomlTable& t) {
  LinkSpec link;
  link.latency_ms = t.required_number("latency_ms", 0.0, kMaxLatencyMs);
  if (!t.has("bandwidth_mbps")) {
    t.fail_here(fmt::format("missing {}.bandwidth_mbps", t.path()));
  } else {
    link.bandwidth_mbps = t.number("bandwidth_mbps", 1.0, kMinBandwidthMbps, kMaxBandwidthMbps);
  }
  return link;
}

static Topology read_topology(TomlFile& file) {
  Topology topo;
  TomlTable root = file.root();
  topo.name = root.string("name", "topology");

  TomlTable emulate = root.table("emulate");
  topo.mode = emulate.choice("mode", "raw", {"raw", "scaled"});
  topo.anchor = emulate.string("anchor", topo.mode == "scaled" ? "gpt3-xl" : "");
  emulate.reject_unknown_keys();

  auto regions = root.tables("region");
  if (regions.empty() && !root.failed()) root.fail_here("no [[region]] tables: a topology needs at least one region");
  for (auto& r : regions) {
    Region region;
    region.line = r.line();
    region.name = r.required_string("name");
    region.nodes = static_cast<int>(r.integer("nodes", 1, 0, kMaxDevices));
    if (!r.failed() && topo.device_count() + region.nodes > kMaxDevices)
      r.fail("nodes", fmt::format("the regions hold {} devices so far, more than the limit of {}",
                                  topo.device_count() + region.nodes, kMaxDevices));
    region.compute_tflops = r.number("compute_tflops", region.compute_tflops, 1e-9, 1e9);
    region.memory_gb = r.number("memory_gb", region.memory_gb, 1e-9, 1e9);
    if (!r.failed() && topo.region_index(region.name) >= 0)
      r.fail("name", fmt::format("region \"{}\" is defined twice", region.name));
    // A region of one node has no inside link; one of several must say what it is.
    if (region.nodes > 1 || r.has("latency_ms") || r.has("bandwidth_mbps")) {
      region.inside = read_link(r);
    } else {
      region.inside = LinkSpec{0, kMaxBandwidthMbps};
    }
    r.reject_unknown_keys();
    topo.regions.push_back(region);
  }

  std::map<std::pair<int, int>, int> line_of_pair;
  for (auto& l : root.tables("link")) {
    std::string a = l.required_string("from");
    std::string b = l.required_string("to");
    LinkSpec spec = read_link(l);
    l.reject_unknown_keys();
    if (l.failed()) break;
    int ia = topo.region_index(a), ib = topo.region_index(b);
    if (ia < 0) { l.fail("from", fmt::format("unknown region \"{}\"", a)); break; }
    if (ib < 0) { l.fail("to", fmt::format("unknown region \"{}\"", b)); break; }
    if (ia == ib) { l.fail("to", fmt::format("link from \"{}\" to itself: set latency_ms/bandwidth_mbps in its [[region]]", a)); break; }
    auto key = ia < ib ? std::make_pair(ia, ib) : std::make_pair(ib, ia);
    if (topo.between.count(key)) {
      l.fail_here(fmt::format("link {} – {} is given twice (first on line {})", a, b, line_of_pair[key]));
      break;
    }
    topo.between[key] = spec;
    line_of_pair[key] = l.line();
  }

  bool has_default = root.has("default_link");
  TomlTable def = root.table("default_link");
  LinkSpec fallback;
  if (has_default) fallback = read_link(def);
  def.reject_unknown_keys();

  if (!root.failed()) {
    for (size_t i = 0; i < topo.regions.size(); ++i)
      for (size_t j = i + 1; j < topo.regions.size(); ++j) {
        auto key = std::make_pair(static_cast<int>(i), static_cast<int>(j));
        if (topo.between.count(key)) continue;
        if (has_default) {
          topo.between[key] = fallback;
        } else {
          root.fail_here(fmt::format("no link between regions \"{}\" and \"{}\" (add a [[link]] or a [default_link])",
                                     topo.regions[i].name, topo.regions[j].name));
          i = topo.regions.size();
          break;
        }
      }
  }
  root.reject_unknown_keys();
  return topo;
}

Result<Topology> parse_topology_string(std::string_view text, const std::string& display_name) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_string(text, display_name));
  Topology topo = read_topology(file);
  SN_TRY(file.status());
  return topo;
}

Result<Topology> parse_topology_file(const std::filesystem::path& path) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_file(path));
  Topology topo = read_topology(file);
  SN_TRY(file.status());
  return topo;
}

std::string topology_to_toml(const Topology& t) {
  std::string out = fmt::format("name = \"{}\"\n\n[emulate]\nmode = \"{}\"\n", t.name, t.mode);
  if (!t.anchor.empty()) out += fmt::format("anchor = \"{}\"\n", t.anchor);
  for (const auto& r : t.regions)
    out += fmt::format("\n[[region]]\nname = \"{}\"\nnodes = {}\nlatency_ms = {:.17g}\nbandwidth_mbps = {:.17g}\n"
                       "compute_tflops = {:.17g}\nmemory_gb = {:.17g}\n",
                       r.name, r.nodes, r.inside.latency_ms, r.inside.bandwidth_mbps,
                       r.compute_tflops, r.memory_gb);
  for (const auto& [key, link] : t.between)
    out += fmt::format("\n[[link]]\nfrom = \"{}\"\nto = \"{}\"\nlatency_ms = {:.17g}\nbandwidth_mbps = {:.17g}\n",
                       t.regions[key.first].name, t.regions[key.second].name, link.latency_ms,
                       link.bandwidth_mbps);
  return out;
}

uint64_t link_matrix_bytes(int devices) {
  const auto n = static_cast<uint64_t>(std::max(devices, 0));
  return n * n * sizeof(LinkSpec) + n * (2 * sizeof(double) + sizeof(int));
}

Result<LinkMatrix> link_matrix_for(const Topology& topology, const std::vector<int>& region_of,
                                   const EmulationScale& scale) {
  const int devices = static_cast<int>(region_of.size());
  if (region_of.size() > static_cast<size_t>(kMaxDevices))
    return input_error("{} devices are more than the limit of {}", region_of.size(), kMaxDevices);
  SN_TRY(check_memory_for(link_matrix_bytes(devices), fmt::format("a link matrix of {} devices", devices)));
  for (int r : region_of)
    if (r < 0 || static_cast<size_t>(r) >= topology.regions.size())
      return make_error("link_matrix_for: region index {} outside the topology's {} regions", r,
                        topology.regions.size());
  LinkMatrix m;
  m.region_of = region_of;
  m.n = static_cast<int>(m.region_of.size());
  m.links.resize(static_cast<size_t>(m.n) * m.n);
  for (int a = 0; a < m.n; ++a) {
    const Region& r = topology.regions[m.region_of[a]];
    m.compute_tflops.push_back(r.compute_tflops);
    m.memory_gb.push_back(r.memory_gb);
    for (int b = 0; b < m.n; ++b)
      if (a != b) m.at(a, b) = scale.apply(topology.link(m.region_of[a], m.region_of[b]));
  }
  return m;
}

Result<LinkMatrix> to_link_matrix(const Topology& topology) {
  return link_matrix_for(topology, topology.device_regions());
}

}  // namespace sn
