// How faithfully the link emulator paces: one message of each size over three
// emulated links, measured delivery time against the link's ideal
// (serialization + latency). JSON on stdout.
#include <nlohmann/json.hpp>

#include <iostream>

#include "net/local_mesh.h"

using namespace sn;
using namespace sn::net;

int main() {
  struct Setting {
    const char* name;
    double latency_ms, bandwidth_mbps;
  };
  const Setting settings[] = {{"datacenter", 1, 10000}, {"continent", 20, 1000}, {"world", 100, 500}};
  const size_t sizes[] = {1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20};
  nlohmann::json out;
  out["benchmark"] = "link";
  out["emulate"] = "raw";
  out["results"] = nlohmann::json::array();
  for (const auto& s : settings) {
    std::string text = fmt::format(
        "[[region]]\nname='a'\nnodes=1\n[[region]]\nname='b'\nnodes=1\n[[link]]\nfrom='a'\nto='b'\n"
        "latency_ms={}\nbandwidth_mbps={}\n", s.latency_ms, s.bandwidth_mbps);
    auto topology = parse_topology_string(text, s.name);
    auto mesh = LocalMesh::create({"a", "b"}, &*topology);
    if (!mesh.ok()) {
      std::cerr << "bench_link: " << mesh.message() << "\n";
      return 1;
    }
    LinkSpec link = (*mesh)->member(0).link_to(1);
    int micro = 0;
    for (size_t bytes : sizes) {
      solvernet::v1::TensorMessage m;
      m.set_kind("bench");
      m.set_micro(micro);
      m.mutable_tensor()->set_dtype("u8");
      m.mutable_tensor()->add_shape(static_cast<int64_t>(bytes));
      m.mutable_tensor()->set_data(std::string(bytes, 'x'));
      auto start = Clock::now();
      if (!(*mesh)->member(0).send(1, m, Traffic::kPipeline).ok()) return 1;
      auto got = (*mesh)->member(1).receive({"bench", 0, micro, 0, 0, 0}, std::chrono::minutes(5));
      double measured = std::chrono::duration<double>(Clock::now() - start).count();
      if (!got.ok()) {
        std::cerr << "bench_link: " << got.message() << "\n";
        return 1;
      }
      double expected = link.transfer_seconds(static_cast<double>(bytes));
      out["results"].push_back({{"link", s.name}, {"latency_ms", s.latency_ms}, {"bandwidth_mbps", s.bandwidth_mbps},
                                {"bytes", bytes}, {"expected_s", expected}, {"measured_s", measured},
                                {"measured_over_expected", measured / expected}});
      std::cerr << fmt::format("{:<11} {:>9} B  expected {:.4f} s  measured {:.4f} s  ratio {:.3f}\n", s.name, bytes,
                               expected, measured, measured / expected);
      ++micro;
    }
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}
