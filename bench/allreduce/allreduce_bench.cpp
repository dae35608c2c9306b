// Ring all-reduce over emulated links: effective bandwidth against the link
// rate. Members are in one process but talk real gRPC through JobTransport.
// busbw = size × 2(D−1)/D / time is the per-link rate the ring achieved; the
// ideal is the link's bandwidth. JSON on stdout.
#include <nlohmann/json.hpp>

#include <iostream>
#include <thread>

#include "net/local_mesh.h"
#include "train/allreduce.h"
#include "train/train.h"

using namespace sn;

int main() {
  train::init_single_threaded();
  struct Setting {
    const char* name;
    double latency_ms, bandwidth_mbps;
  };
  const Setting settings[] = {{"1Gbps-1ms", 1, 1000}, {"500Mbps-20ms", 20, 500}};
  const int64_t sizes[] = {1 << 20, 4 << 20, 16 << 20};
  nlohmann::json out;
  out["benchmark"] = "allreduce";
  out["emulate"] = "raw";
  out["results"] = nlohmann::json::array();
  for (int replicas : {2, 4}) {
    for (const auto& s : settings) {
      std::string text = fmt::format("[[region]]\nname='r'\nnodes={}\nlatency_ms={}\nbandwidth_mbps={}\n", replicas,
                                     s.latency_ms, s.bandwidth_mbps);
      auto topology = parse_topology_string(text, s.name);
      auto mesh = net::LocalMesh::create(std::vector<std::string>(static_cast<size_t>(replicas), "r"), &*topology);
      if (!mesh.ok()) {
        std::cerr << "bench_allreduce: " << mesh.message() << "\n";
        return 1;
      }
      std::vector<int> ring;
      for (int i = 0; i < replicas; ++i) ring.push_back(i);
      int64_t step = 0;
      for (int64_t bytes : sizes) {
        std::vector<torch::Tensor> buffers;
        for (int i = 0; i < replicas; ++i) buffers.push_back(torch::full({bytes / 4}, static_cast<float>(i + 1)));
        std::vector<Status> results(static_cast<size_t>(replicas));
        train::RingOptions options;
        options.chunk_bytes = 1 << 20;
        auto start = std::chrono::steady_clock::now();
        std::vector<std::thread> threads;
        for (int i = 0; i < replicas; ++i)
          threads.emplace_back([&, i] {
            results[static_cast<size_t>(i)] =
                train::ring_allreduce((*mesh)->member(static_cast<size_t>(i)), ring, buffers[static_cast<size_t>(i)], step, options);
          });
        for (auto& t : threads) t.join();
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        ++step;
        for (const auto& r : results)
          if (!r.ok()) {
            std::cerr << "bench_allreduce: " << r.message() << "\n";
            return 1;
          }
        const float expected = static_cast<float>(replicas * (replicas + 1) / 2);
        bool correct = true;
        for (const auto& b : buffers) correct = correct && torch::all(b == expected).item<bool>();
        double factor = 2.0 * (replicas - 1) / replicas;
        double busbw_mbps = static_cast<double>(bytes) * factor * 8 / seconds / 1e6;
        double ideal_s = static_cast<double>(bytes) * factor * 8 / (s.bandwidth_mbps * 1e6) + 2.0 * (replicas - 1) * s.latency_ms / 1e3;
        out["results"].push_back({{"replicas", replicas}, {"link", s.name}, {"bytes", bytes}, {"seconds", seconds},
                                  {"ideal_seconds", ideal_s}, {"bus_bandwidth_mbps", busbw_mbps},
                                  {"link_bandwidth_mbps", s.bandwidth_mbps},
                                  {"bus_over_link", busbw_mbps / s.bandwidth_mbps}, {"correct", correct}});
        std::cerr << fmt::format("D={} {:<13} {:>9} B  {:.3f} s (ideal {:.3f})  busbw {:.0f} Mbps of {:.0f}  {}\n", replicas, s.name,
                                 bytes, seconds, ideal_s, busbw_mbps, s.bandwidth_mbps, correct ? "ok" : "WRONG SUM");
      }
    }
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}
