// The row kernels, compiled once per instruction set: CMakeLists.txt builds this file with
// KDLOSS_KERNEL_NAMESPACE and KDLOSS_KERNEL_TABLE naming the set (baseline, avx2, avx512) and with the
// matching compiler flags. Only the kernels may be compiled with wider instructions than the baseline, so
// this file includes nothing that the rest of the library or its host also instantiates.

#include "kdloss/detail/kernel_table.hpp"
#include "kdloss/detail/run_rows.hpp"
#include "kdloss/detail/sample_rows.hpp"
#include "kdloss/detail/top_k_rows.hpp"
#include "kernel_tables.hpp"

#define KDLOSS_KERNEL_STRING_IMPL(name) #name
#define KDLOSS_KERNEL_STRING(name) KDLOSS_KERNEL_STRING_IMPL(name)

namespace kdloss::detail {

KernelTable KDLOSS_KERNEL_TABLE() noexcept {
    namespace kernels = KDLOSS_KERNEL_NAMESPACE;
    return {KDLOSS_KERNEL_STRING(KDLOSS_KERNEL_NAMESPACE),
            &kernels::run_rows<float>,
            &kernels::run_rows<double>,
            &kernels::top_k_rows<float>,
            &kernels::top_k_rows<double>,
            &kernels::sample_rows<float>,
            &kernels::sample_rows<double>};
}

}  // namespace kdloss::detail
