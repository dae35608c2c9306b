// One OpenBLAS kernel set for every solvernet process, so that training is
// bitwise equal across x86 machines (docs/verification.md, "Kernel pin").
#pragma once

namespace sn {

// OpenBLAS picks its kernels per CPU when the library loads, and different
// kernels sum in different orders. OPENBLAS_CORETYPE overrides the choice but
// is read only at load time, before main, so this sets it to "Haswell" (AVX2 +
// FMA: every x86-64 CPU since 2013, Intel Haswell and AMD Zen) and
// re-executes the process once with the same arguments (/proc/self/cmdline).
// A different OPENBLAS_CORETYPE in the environment is overridden (with a
// warning): a node's results must not depend on how its machine is set up.
// SOLVERNET_BLAS_CORETYPE names another kernel set instead of Haswell, for the
// test that shows the pin is needed. A CPU without AVX2/FMA keeps OpenBLAS's
// choice and gets a warning on stderr naming the consequence; a failed exec
// (no /proc) is warned too and the process goes on unpinned.
// Call it first thing in main (or a static initializer), before any thread.
void pin_blas_kernels();

}  // namespace sn
