// The row kernels, compiled once per instruction set: CMakeLists.txt builds this file with
// KDLOSS_KERNEL_NAMESPACE and KDLOSS_KERNEL_TABLE naming the set (baseline, avx2, avx512) and with the
// matching compiler flags. Only the kernels may be compiled with wider instructions than the baseline, so
// this file includes nothing that the rest of the module also instantiates.

#include "kdloss/detail/run_rows.hpp"
#include "kernel_table.hpp"

#define KDLOSS_KERNEL_STRING_IMPL(name) #name
#define KDLOSS_KERNEL_STRING(name) KDLOSS_KERNEL_STRING_IMPL(name)

namespace kdloss::python {

KernelTable KDLOSS_KERNEL_TABLE() noexcept {
    return {KDLOSS_KERNEL_STRING(KDLOSS_KERNEL_NAMESPACE), &detail::KDLOSS_KERNEL_NAMESPACE::run_rows<float>,
            &detail::KDLOSS_KERNEL_NAMESPACE::run_rows<double>};
}

}  // namespace kdloss::python
