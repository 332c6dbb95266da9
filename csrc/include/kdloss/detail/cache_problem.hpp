#pragma once

// One validated call of a teacher-cache builder (teacher_cache.hpp), as plain data: what the row kernels
// read, where they write, and the per-thread scratch they work in. Built after every argument check has
// passed; the one thing the kernels still find is a row whose logits have no softmax (see CacheKernel).

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"

namespace kdloss::detail {

template <class T>
struct CacheProblem {
    std::size_t rows = 0;
    std::size_t classes = 0;
    const T* logits = nullptr;
    std::ptrdiff_t logit_stride = 0;
    double temperature = 1.0;
    std::size_t slots = 0;        // listed classes a row: k, or min(num_samples, classes)
    std::size_t num_samples = 0;  // sample_teacher's draws a row
    std::uint64_t seed = 0;       // sample_teacher's

    std::int32_t* indices = nullptr;
    std::ptrdiff_t index_stride = 0;
    T* logprobs = nullptr;
    std::ptrdiff_t logprob_stride = 0;
};

// A listed class and its logit (top_k's heap and its sorted output).
template <class T>
struct Candidate {
    T value;
    std::int32_t index;
};

// A class drawn by sample_teacher and how often.
struct DrawnClass {
    std::uint64_t count;
    std::int32_t index;
};

// top_k's groups (top_k_rows.hpp): one lane of this many consecutive Packs, about 2k groups a row, whose
// maxima are selected from.
constexpr std::size_t top_k_group_packs(std::size_t classes, std::size_t k) noexcept {
    return classes / (2 * k) > 0 ? classes / (2 * k) : 1;
}
constexpr std::size_t top_k_groups(std::size_t classes, std::size_t k) noexcept {
    const std::size_t chunk = top_k_group_packs(classes, k) * lanes;
    return (classes + chunk - 1) / chunk * lanes;
}

// sample_teacher's exponentials are summed in blocks of this many elements, whose running totals let the
// walk over the sorted draws skip whole blocks (sample_rows.hpp).
constexpr std::size_t sample_block = 64;

constexpr std::size_t blocks_of(std::size_t classes) noexcept { return (classes + sample_block - 1) / sample_block; }

// A thread's scratch; each kernel uses its own part (the other pointers are null).
template <class T>
struct CacheScratch {
    T* group_maxima = nullptr;           // top_k: top_k_groups(classes, k)
    Candidate<T>* candidates = nullptr;  // top_k: classes
    T* exponentials = nullptr;           // sample_teacher: blocks_of(classes) * sample_block
    double* cumulative = nullptr;        // sample_teacher: blocks_of(classes) + 1
    double* draws = nullptr;             // sample_teacher: num_samples
    DrawnClass* drawn = nullptr;         // sample_teacher: min(num_samples, classes)
};

// What a kernel returns when every row of its range was written.
constexpr std::size_t no_bad_row = std::numeric_limits<std::size_t>::max();

// Computes rows [begin, end) and returns no_bad_row, or stops at the first row that holds a NaN or +inf, or
// nothing but -inf, and returns its index (its outputs and those of the rows after it are left unwritten).
// The caller, which alone formats messages, then says what is wrong with it.
template <class T>
using CacheKernel = std::size_t (*)(const CacheProblem<T>& problem, std::size_t begin, std::size_t end,
                                    const CacheScratch<T>& scratch);

}  // namespace kdloss::detail
