#pragma once

// The kernel tables that kernels.cpp defines, one per instruction set compiled in (CMakeLists.txt's
// kdloss_isas); dispatch.cpp calls those that KDLOSS_HAS_<SET>_KERNELS says exist.

#include "kdloss/detail/kernel_table.hpp"

namespace kdloss::detail {

KernelTable baseline_kernel_table() noexcept;
KernelTable avx2_kernel_table() noexcept;
KernelTable avx512_kernel_table() noexcept;
KernelTable native_kernel_table() noexcept;

}  // namespace kdloss::detail
