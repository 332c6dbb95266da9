#pragma once

// The row kernels of one instruction set, as compiled by kernels.cpp.

#include "kdloss/detail/batch_problem.hpp"

namespace kdloss::python {

struct KernelTable {
    const char* isa = nullptr;  // null: not compiled into this build
    detail::RowsKernel<float> float_rows = nullptr;
    detail::RowsKernel<double> double_rows = nullptr;

    template <class T>
    detail::RowsKernel<T> rows() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_rows;
        else return double_rows;
    }
};

KernelTable baseline_kernel_table() noexcept;
KernelTable avx2_kernel_table() noexcept;
KernelTable avx512_kernel_table() noexcept;
KernelTable native_kernel_table() noexcept;

}  // namespace kdloss::python
