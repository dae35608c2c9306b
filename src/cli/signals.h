// Ctrl-C and SIGTERM handling for long-running commands: the first signal
// asks the work to stop cleanly (children stopped, temp files removed).
#pragma once

#include <atomic>

namespace sn::cli {

// Installs handlers for SIGINT and SIGTERM that set the returned flag.
const std::atomic<bool>& install_stop_handlers();
bool stop_requested();

// Blocks SIGINT/SIGTERM in this thread and every thread it creates later;
// wait_for_stop_signal() then waits for one. Call before starting gRPC/DHT.
void block_stop_signals();
int wait_for_stop_signal();

}  // namespace sn::cli
