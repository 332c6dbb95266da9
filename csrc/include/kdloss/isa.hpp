#pragma once

// Which compiled kernels run kdloss's loss and teacher-cache builders in this process.
//
// Linked as kdloss::kdloss (the compiled library, which defines KDLOSS_DISPATCHED for its users), the kernels
// were compiled once per instruction set (x86-64: baseline, avx2 with FMA, avx512; elsewhere the baseline,
// which on aarch64 is NEON) and the widest that this CPU and its operating system run is chosen at the first
// call, unless the environment variable KDLOSS_FORCE_ISA names one. Used header-only (kdloss::header_only),
// the kernels are compiled in the host's own translation units with the host's own flags: isa_info() then
// reports "header_only" and KDLOSS_FORCE_ISA has no effect.

#include <string>
#include <vector>

#include "kdloss/detail/kernel_table.hpp"

#if !defined(KDLOSS_DISPATCHED)
#include "kdloss/detail/run_rows.hpp"
#include "kdloss/detail/sample_rows.hpp"
#include "kdloss/detail/top_k_rows.hpp"
#endif

namespace kdloss {

struct IsaInfo {
    std::string active;                  // the kernels that run: one of `compiled`
    std::vector<std::string> compiled;   // compiled into this build, narrowest first
    std::vector<std::string> supported;  // those of `compiled` that this CPU runs
    std::string forced;                  // KDLOSS_FORCE_ISA's value; empty when unset or header-only
};

#if defined(KDLOSS_DISPATCHED)

// Throws std::runtime_error when KDLOSS_FORCE_ISA names a set that is not compiled in or that this CPU cannot
// run; so do the loss and the builders (at their first call), rather than run other kernels than asked for.
IsaInfo isa_info();

namespace detail {
// The kernels chosen for this process (csrc/lib/dispatch.cpp); throws as isa_info() does.
const KernelTable& active_kernels();

template <class T>
RowsKernel<T> rows_kernel() {
    return active_kernels().rows<T>();
}
template <class T>
CacheKernel<T> top_k_kernel() {
    return active_kernels().top_k<T>();
}
template <class T>
CacheKernel<T> sample_kernel() {
    return active_kernels().sample<T>();
}
}  // namespace detail

#else

inline IsaInfo isa_info() { return {"header_only", {"header_only"}, {"header_only"}, ""}; }

// Each entry point instantiates only the kernel it runs.
namespace detail {
template <class T>
RowsKernel<T> rows_kernel() noexcept {
    return &run_rows<T>;
}
template <class T>
CacheKernel<T> top_k_kernel() noexcept {
    return &top_k_rows<T>;
}
template <class T>
CacheKernel<T> sample_kernel() noexcept {
    return &sample_rows<T>;
}
}  // namespace detail

#endif

}  // namespace kdloss
