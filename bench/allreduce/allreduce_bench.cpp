// Ring all-reduce bus bandwidth, TLS against --insecure side by side. Members
// are in one process but talk real gRPC through JobTransport, over unpaced
// loopback (where the cost of encryption shows most) and over emulated links.
// busbw = size × 2(D−1)/D / time is the per-link rate the ring achieved; the
// ideal is the link's bandwidth. JSON on stdout.
//
// The transport mode is process-wide and one-way (net/tls.h), so each (D, link,
// mode) case runs in a child process of this program; the modes alternate and
// each keeps its fastest of two runs, so background load hits both alike.
#include <nlohmann/json.hpp>

#include <iostream>
#include <map>
#include <thread>

#include "../common/run_json.h"
#include "core/process.h"
#include "net/local_mesh.h"
#include "net/tls.h"
#include "train/allreduce.h"
#include "train/train.h"

using namespace sn;

namespace {

struct Setting {
  const char* name;
  double latency_ms, bandwidth_mbps;  // bandwidth 0: unpaced loopback
};
const Setting kSettings[] = {{"loopback", 0, 0}, {"1Gbps-1ms", 1, 1000}, {"500Mbps-20ms", 20, 500}};
const int64_t kSizes[] = {1 << 20, 4 << 20, 16 << 20};

// One case in this process: prints {"connect_seconds", "results": [{bytes, seconds, correct}]}.
int run_case(int replicas, const Setting& s) {
  train::init_single_threaded();
  std::optional<Topology> topology;
  if (s.bandwidth_mbps > 0) {
    std::string text = fmt::format("[[region]]\nname='r'\nnodes={}\nlatency_ms={}\nbandwidth_mbps={}\n", replicas,
                                   s.latency_ms, s.bandwidth_mbps);
    auto parsed = parse_topology_string(text, s.name);
    if (!parsed.ok()) {
      std::cerr << "bench_allreduce: " << parsed.message() << "\n";
      return 1;
    }
    topology = std::move(parsed).value();
  }
  auto mesh = net::LocalMesh::create(std::vector<std::string>(static_cast<size_t>(replicas), "r"),
                                     topology ? &*topology : nullptr);
  if (!mesh.ok()) {
    std::cerr << "bench_allreduce: " << mesh.message() << "\n";
    return 1;
  }
  std::vector<int> ring;
  for (int i = 0; i < replicas; ++i) ring.push_back(i);
  int64_t step = 0;
  nlohmann::json out;
  out["results"] = nlohmann::json::array();
  // The first all-reduce (64 KiB) opens every link: connection set-up, with
  // the TLS handshakes, is timed apart from the bandwidth.
  for (int64_t bytes : {int64_t(64) << 10, kSizes[0], kSizes[1], kSizes[2]}) {
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
    if (step == 1)
      out["connect_seconds"] = seconds;
    else
      out["results"].push_back({{"bytes", bytes}, {"seconds", seconds}, {"correct", correct}});
  }
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "--case") {
    if (std::string(argv[4]) == "insecure") net::use_insecure();
    for (const auto& s : kSettings)
      if (s.name == std::string(argv[3])) return run_case(std::stoi(argv[2]), s);
    return 2;
  }
  const std::string self = self_executable().string();
  const auto tmp = std::filesystem::temp_directory_path() / ("sn-bench-allreduce-" + std::to_string(::getpid()) + ".json");
  nlohmann::json out;
  out["benchmark"] = "allreduce";
  out["emulate"] = "raw";
  out["modes"] = {"tls", "insecure"};
  out["results"] = nlohmann::json::array();
  double worst_ratio = 1e9;
  for (int replicas : {2, 4}) {
    for (const auto& s : kSettings) {
      // Fastest of two runs per mode and size, the modes alternating.
      std::map<std::string, std::map<int64_t, double>> best;
      std::map<std::string, double> connect;
      bool correct = true;
      for (int rep = 0; rep < 2; ++rep)
        for (std::string mode : {"tls", "insecure"}) {
          auto run = bench::run_json({self, "--case", std::to_string(replicas), s.name, mode}, tmp);
          if (!run.ok()) {
            std::cerr << "bench_allreduce: D=" << replicas << " " << s.name << " " << mode << ": " << run.message() << "\n";
            return 1;
          }
          double c = (*run)["connect_seconds"].get<double>();
          connect[mode] = connect.count(mode) ? std::min(connect[mode], c) : c;
          for (const auto& r : (*run)["results"]) {
            int64_t bytes = r["bytes"].get<int64_t>();
            double seconds = r["seconds"].get<double>();
            correct = correct && r["correct"].get<bool>();
            best[mode][bytes] = best[mode].count(bytes) ? std::min(best[mode][bytes], seconds) : seconds;
          }
        }
      for (int64_t bytes : kSizes) {
        double factor = 2.0 * (replicas - 1) / replicas;
        auto busbw = [&](const std::string& mode) { return static_cast<double>(bytes) * factor * 8 / best[mode][bytes] / 1e6; };
        double tls = busbw("tls"), plain = busbw("insecure");
        nlohmann::json row = {{"replicas", replicas}, {"link", s.name}, {"bytes", bytes},
                              {"tls_seconds", best["tls"][bytes]}, {"insecure_seconds", best["insecure"][bytes]},
                              {"tls_bus_bandwidth_mbps", tls}, {"insecure_bus_bandwidth_mbps", plain},
                              {"tls_over_insecure", tls / plain},
                              {"tls_connect_seconds", connect["tls"]}, {"insecure_connect_seconds", connect["insecure"]},
                              {"correct", correct}};
        if (s.bandwidth_mbps > 0) {
          double ideal_s = static_cast<double>(bytes) * factor * 8 / (s.bandwidth_mbps * 1e6) + 2.0 * (replicas - 1) * s.latency_ms / 1e3;
          row["ideal_seconds"] = ideal_s;
          row["link_bandwidth_mbps"] = s.bandwidth_mbps;
          row["tls_bus_over_link"] = tls / s.bandwidth_mbps;
        }
        worst_ratio = std::min(worst_ratio, tls / plain);
        out["results"].push_back(row);
        std::cerr << fmt::format("D={} {:<13} {:>9} B  busbw TLS {:>6.0f} Mbps, insecure {:>6.0f} Mbps: TLS/insecure {:.3f}  {}\n",
                                 replicas, s.name, bytes, tls, plain, tls / plain, correct ? "ok" : "WRONG SUM");
      }
      std::cerr << fmt::format("D={} {:<13} connect (first 64 KiB all-reduce): TLS {:.3f} s, insecure {:.3f} s\n", replicas,
                               s.name, connect["tls"], connect["insecure"]);
    }
  }
  std::filesystem::remove(tmp);
  out["worst_tls_over_insecure"] = worst_ratio;
  out["target"] = "TLS keeps >= 0.90 of the insecure bus bandwidth";
  std::cout << out.dump(2) << std::endl;
  return 0;
}
