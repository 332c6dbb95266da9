#pragma once

// The row kernels of one instruction set, as compiled by kernels.cpp.

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/cache_problem.hpp"

namespace kdloss::python {

struct KernelTable {
    const char* isa = nullptr;  // null: not compiled into this build
    detail::RowsKernel<float> float_rows = nullptr;
    detail::RowsKernel<double> double_rows = nullptr;
    // The teacher-cache builders' (teacher_cache.hpp).
    detail::CacheKernel<float> float_top_k = nullptr;
    detail::CacheKernel<double> double_top_k = nullptr;
    detail::CacheKernel<float> float_sample = nullptr;
    detail::CacheKernel<double> double_sample = nullptr;

    template <class T>
    detail::RowsKernel<T> rows() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_rows;
        else return double_rows;
    }
    template <class T>
    detail::CacheKernel<T> top_k() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_top_k;
        else return double_top_k;
    }
    template <class T>
    detail::CacheKernel<T> sample() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_sample;
        else return double_sample;
    }
};

KernelTable baseline_kernel_table() noexcept;
KernelTable avx2_kernel_table() noexcept;
KernelTable avx512_kernel_table() noexcept;
KernelTable native_kernel_table() noexcept;

}  // namespace kdloss::python
