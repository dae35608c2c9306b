#include "core/kernels.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "core/fs.h"

namespace sn {

void pin_blas_kernels() {
  const char* chosen = std::getenv("SOLVERNET_BLAS_CORETYPE");
  const char* wanted = chosen != nullptr ? chosen : "Haswell";
  const char* current = std::getenv("OPENBLAS_CORETYPE");
  if (current != nullptr && std::strcmp(current, wanted) == 0) return;
#if defined(__x86_64__)
  if (chosen == nullptr && (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))) {
    std::cerr << "solvernet: this CPU lacks AVX2/FMA: training will not be bitwise reproducible on other "
                 "machines (verification would fail)" << std::endl;
    return;
  }
  if (current != nullptr)
    std::cerr << "solvernet: OPENBLAS_CORETYPE=" << current << " overridden: every node runs " << wanted
              << " kernels, so that replays match bit for bit" << std::endl;
  std::string cmdline = read_file("/proc/self/cmdline").value_or("");
  std::vector<std::string> args;
  for (size_t start = 0; start < cmdline.size();) {
    size_t end = cmdline.find('\0', start);
    if (end == std::string::npos) end = cmdline.size();
    args.push_back(cmdline.substr(start, end - start));
    start = end + 1;
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  setenv("OPENBLAS_CORETYPE", wanted, 1);
  setenv("OPENBLAS_NUM_THREADS", "1", 0);
  if (!args.empty()) execv("/proc/self/exe", argv.data());
  std::cerr << "solvernet: could not re-execute to pin OpenBLAS kernels: "
            << (args.empty() ? "no /proc/self/cmdline" : strerror(errno)) << std::endl;
#endif
}

}  // namespace sn
