#pragma once

// The row kernels of one instruction set, as one table of function pointers: what kdloss::kdloss's dispatch
// hands the loss and the teacher-cache builders.

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/cache_problem.hpp"

namespace kdloss::detail {

struct KernelTable {
    const char* isa = nullptr;
    RowsKernel<float> float_rows = nullptr;
    RowsKernel<double> double_rows = nullptr;
    // The teacher-cache builders' (teacher_cache.hpp).
    CacheKernel<float> float_top_k = nullptr;
    CacheKernel<double> double_top_k = nullptr;
    CacheKernel<float> float_sample = nullptr;
    CacheKernel<double> double_sample = nullptr;

    template <class T>
    RowsKernel<T> rows() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_rows;
        else return double_rows;
    }
    template <class T>
    CacheKernel<T> top_k() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_top_k;
        else return double_top_k;
    }
    template <class T>
    CacheKernel<T> sample() const noexcept {
        if constexpr (sizeof(T) == sizeof(float)) return float_sample;
        else return double_sample;
    }
};

}  // namespace kdloss::detail
