// Ctrl-C and SIGTERM handling for long-running commands: the first signal
// asks the work to stop cleanly (children stopped, temp files removed), and
// the command then exits 128 + the signal's number (130 for SIGINT, 143 for
// SIGTERM), as a process killed by it would; main() applies that code.
#pragma once

#include <atomic>
#include <chrono>

namespace sn::cli {

// Installs handlers for SIGINT and SIGTERM that set the returned flag (the
// process-wide sn::stop_flag(), which run_command() and data preparation poll).
const std::atomic<bool>& install_stop_handlers();
bool stop_requested();

// Blocks SIGINT/SIGTERM in this thread and every thread it creates later;
// wait_for_stop_signal() then waits for one (and records it as the stop
// signal). Call before starting gRPC/DHT.
void block_stop_signals();
// Once the signal has come, the process has kStopGrace to finish its cleanup;
// then it says so on stderr and exits 128 + the signal's number regardless.
inline constexpr std::chrono::seconds kStopGrace{15};
int wait_for_stop_signal();

// 128 + the stop signal's number if a stop was requested, else 0.
int stop_exit_code();

}  // namespace sn::cli
