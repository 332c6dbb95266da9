#pragma once

// One validated call, as plain data: what the kernels read and where they write. Built by
// DistillationLoss<T> after every check has passed, so the kernels never fail.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kdloss/divergence.hpp"
#include "kdloss/sparse_teacher.hpp"

namespace kdloss::detail {

enum class LabelKind { none, class_indices, distributions };

template <class T>
struct BatchProblem {
    std::size_t rows = 0;
    std::size_t classes = 0;
    const T* student = nullptr;
    std::ptrdiff_t student_stride = 0;
    const T* teacher = nullptr;
    std::ptrdiff_t teacher_stride = 0;
    // A sparse teacher instead (teacher then points at the student's logits, which only a hard term reads).
    const SparseTeacherView* sparse = nullptr;
    Tail tail = Tail::bucket;

    LabelKind label_kind = LabelKind::none;
    const std::int64_t* class_indices = nullptr;
    std::ptrdiff_t class_index_stride = 1;
    std::int64_t ignore_index = -100;
    const T* targets = nullptr;
    std::ptrdiff_t target_stride = 0;

    Divergence divergence = Divergence::forward_kl;
    double beta = 0.5;  // jsd's
    double skew = 0.1;  // the skew divergences'
    double temperature = 1.0;
    double soft_weight = 1.0;     // (1 - alpha) with labels, 1 without; 0 drops the soft term entirely
    double hard_weight = 0.0;     // alpha with labels, 0 without; 0 drops the hard term entirely
    double gradient_scale = 1.0;  // 1 / (counted rows) for "mean", 1 otherwise

    double* row_losses = nullptr;  // one per row, always written (0 for ignored rows)
    // Loss parts: not null, row_losses gets each row's soft term T^2 D and this its hard term CE, unweighted
    // (0 for a term the problem does not have).
    double* row_hard_losses = nullptr;
    T* gradient = nullptr;  // null: loss only
    std::ptrdiff_t gradient_stride = 0;
    // Set on the double problem that computes a row of a float call again (widened_rows, run_rows.hpp): its results
    // need only float's tolerance, by which redo_inexact_rows then judges them.
    bool float_tolerance = false;
};

// The kernels' vector lanes (lane_math.hpp), and the row length up to which rows are processed a block of
// `lanes` rows at a time (row_kernel.hpp): up to it, a long row's own passes (its sums, divisions, the next
// row's set-up) cost more than its share of a block's, in batches that fit in L3. Chosen with AVX-512, the ISA
// least in blocks' favour; in batches much larger than L3 blocks lose a little earlier, a trade made for the
// cache (benchmarks/README.md, "Kernel design decisions", has the measurements).
constexpr std::size_t lanes = 16;
template <class T>
constexpr std::size_t block_max_classes = std::is_same_v<T, float> ? 160 : 128;
static_assert(block_max_classes<double> >= lanes, "long rows must fill at least one Pack (lane_math.hpp)");

// Elements of per-thread scratch the kernels need for rows of `classes` classes. Long rows: up to three rows
// of exponentials and one of logit differences (mixture.hpp). Blocks: lanes x classes each of the student
// (then its exponentials, then the gradient), the teacher (then its exponentials), the targets, the hard
// exponentials and the logit differences. (A sparse teacher's row shorter
// than `lanes` takes five rows of `lanes`: sparse_kl.hpp.) A whole number of 64 bytes.
template <class T>
std::size_t kernel_scratch_elements(std::size_t classes) noexcept {
    const std::size_t elements =
        classes <= block_max_classes<T> ? 5 * lanes * std::max<std::size_t>(classes, 2) : 4 * classes;
    constexpr std::size_t line = 64 / sizeof(T);
    return (elements + line - 1) / line * line;
}

// Rows of a float call computed again in double together (widened_rows, run_rows.hpp): as many as the double
// kernels take in a block where their rows are that short, else one at a time.
inline std::size_t widened_group(std::size_t classes) noexcept {
    return classes <= block_max_classes<double> ? lanes : 1;
}

// Doubles that such a group takes: its logits, targets and gradient, its losses and labels, and the double
// kernels' scratch.
inline std::size_t widened_elements(std::size_t classes) noexcept {
    return widened_group(classes) * (4 * classes + 3) + kernel_scratch_elements<double>(classes);
}

// Per-thread scratch, in elements of T: the kernels', and a float call's widened rows' after it.
template <class T>
std::size_t scratch_elements(std::size_t classes) noexcept {
    if constexpr (std::is_same_v<T, float>) return kernel_scratch_elements<T>(classes) + 2 * widened_elements(classes);
    return kernel_scratch_elements<T>(classes);
}

// Per-thread scratch for a sparse teacher of k slots a row, in elements of T, ahead of the rows' buffers: k of
// sparse_kl.hpp's ListedClass, 56 bytes, a whole number of elements of T, so the buffers after them stay aligned.
constexpr std::size_t listed_class_bytes = 56;
template <class T>
std::size_t sparse_scratch_elements(std::size_t k) noexcept {
    return k * (listed_class_bytes / sizeof(T));
}

// Computes rows [begin, end) of `problem`; `scratch` holds scratch_elements(classes) elements.
template <class T>
using RowsKernel = void (*)(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch);

}  // namespace kdloss::detail
