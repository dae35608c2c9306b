#include "cli/signals.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "core/process.h"

namespace sn::cli {
namespace {
void on_signal(int signal_number) { sn::note_stop_signal(signal_number); }
}  // namespace

const std::atomic<bool>& install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  return sn::stop_flag();
}

bool stop_requested() { return sn::stop_requested(); }

void block_stop_signals() {
  // Threads that libraries started before this call do not block the signals,
  // and the kernel may deliver one to them: there the handler notes it instead
  // of the default action ending the process mid-cleanup.
  install_stop_handlers();
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int wait_for_stop_signal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  // Either this thread takes the signal, or a thread that does not block it
  // ran the handler: look at both.
  const timespec tick{0, 100 * 1000 * 1000};
  while (sn::stop_signal() == 0) {
    int signal_number = sigtimedwait(&set, nullptr, &tick);
    if (signal_number > 0) sn::note_stop_signal(signal_number);
  }
  // A server told to stop is gone within a bounded time even if a cleanup
  // step hangs (a peer that froze, a chain that vanished): nothing it still
  // holds is worth outliving the parent that asked it to go.
  std::thread([signal_number = sn::stop_signal()] {
    std::this_thread::sleep_for(kStopGrace);
    const std::string line = fmt::format("solvernet: still stopping {} s after signal {}; exiting now\n",
                                         std::chrono::duration_cast<std::chrono::seconds>(kStopGrace).count(),
                                         signal_number);
    [[maybe_unused]] auto written = ::write(2, line.data(), line.size());
    ::_exit(128 + signal_number);
  }).detach();
  return sn::stop_signal();
}

int stop_exit_code() { return sn::stop_signal() > 0 ? 128 + sn::stop_signal() : 0; }

}  // namespace sn::cli
