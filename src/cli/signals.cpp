#include "cli/signals.h"

#include <signal.h>

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
  int signal_number = 0;
  while (sigwait(&set, &signal_number) != 0) {
  }
  sn::note_stop_signal(signal_number);
  return signal_number;
}

int stop_exit_code() { return sn::stop_signal() > 0 ? 128 + sn::stop_signal() : 0; }

}  // namespace sn::cli
