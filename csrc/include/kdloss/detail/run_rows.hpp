#pragma once

// A range of rows of a validated BatchProblem: the function that the dispatcher and the thread pool call.
// Which terms exist is decided here, from one table of the instantiations (rows_kernel), and baked into the
// row kernels as template arguments.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/cross_entropy.hpp"
#include "kdloss/detail/exact_row.hpp"
#include "kdloss/detail/forward_kl.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/mixture.hpp"
#include "kdloss/detail/reverse_kl.hpp"
#include "kdloss/detail/row_kernel.hpp"
#include "kdloss/detail/sparse_kl.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// Long rows' losses from their sums, `lanes` rows at a time: one row per lane of loss_from_sums, as in a block.
template <class T, class Terms>
class RowLosses {
public:
    // `widened`: where rows to be computed again in double wait (redo_inexact_rows).
    RowLosses(const BatchProblem<T>& problem, WidenedRows<T>& widened) noexcept : problem_(problem), widened_(widened) {
        const RowSums<Terms> neutral = RowSums<Terms>::neutral();
        for (std::size_t k = 0; k < lanes; ++k) put(k, 0, neutral, GradientSize<double>{});
    }

    // A row's sums, and with a gradient its soft part's GradientSize.
    void add(std::size_t row, const RowSums<Terms>& sums, const GradientSize<double>& size) noexcept {
        put(count_, row, sums, size);
        if (++count_ == lanes) flush();
    }

    // Writes the losses of the rows added since the last flush.
    void flush() noexcept {
        if (count_ == 0) return;
        // Lanes past count_ hold an earlier row's sums, or neutral ones: computed and dropped.
        typename Terms::template Sums<Pack<double>> sums;
        for_each_sum<Terms>([](Pack<double>& sum, const Column& column) { sum = Pack<double>::load(column); }, sums,
                            columns_);
        const Pack<double> divergence = store_row_losses<Terms>(problem_, sums, rows_, count_);
        const GradientSize<Pack<double>> size{Pack<double>::load(largest_), Pack<double>::load(terms_)};
        redo_inexact_rows<Terms>(problem_, sums, divergence, rows_, count_, widened_,  // gradient rows written
                                 Terms::gradient ? &size : nullptr);
        count_ = 0;
    }

private:
    using Column = double[lanes];  // one sum of `lanes` rows, loaded as one Pack

    void put(std::size_t k, std::size_t row, const RowSums<Terms>& sums, const GradientSize<double>& size) noexcept {
        rows_[k] = row;
        for_each_sum<Terms>([k](Column& column, double sum) { column[k] = sum; }, columns_, sums);
        largest_[k] = size.largest;
        terms_[k] = size.terms;
    }

    const BatchProblem<T>& problem_;
    WidenedRows<T>& widened_;
    std::size_t count_ = 0;
    std::size_t rows_[lanes];
    typename Terms::template Sums<Column> columns_;
    Column largest_, terms_;  // the rows' GradientSize
};

template <class T, class Terms>
void run_rows_with(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    const Exp2Scale<T> soft = soft_exponent<T>(problem.temperature);
    // Rows computed again in double wait here, after the kernels' scratch, until a group of them is (exact_row.hpp).
    WidenedRows<T> widened(scratch + kernel_scratch_elements<T>(problem.classes), problem.classes);
    if (problem.classes <= block_max_classes<T>) {
        // Short rows: gather up to `lanes` counted rows at a time into one block. A block reads its rows a
        // tile at a time, sixteen rows side by side, which the processor's own prefetching does not follow
        // from memory: where the rows are contiguous, the next `lanes` rows are fetched ahead (fetching the
        // gradient's rows too did not help).
        const bool contiguous = problem.student_stride == static_cast<std::ptrdiff_t>(problem.classes) &&
                                problem.teacher_stride == static_cast<std::ptrdiff_t>(problem.classes);
        auto next_rows = [&](std::size_t first) -> RowLogits<T> {
            if (!contiguous || end - first < lanes) return {};
            const auto offset = static_cast<std::ptrdiff_t>(first * problem.classes);
            return {problem.student + offset, problem.teacher + offset};
        };
        std::size_t block_rows[lanes];
        std::size_t count = 0;
        for (std::size_t i = begin; i < end; ++i) {
            if (is_ignored(problem, i)) {
                zero_ignored_row<T, Terms>(problem, i);
                continue;
            }
            block_rows[count++] = i;
            if (count == lanes) {
                distill_block<T, Terms>(problem, soft, block_rows, count, next_rows(i + 1), scratch, widened);
                count = 0;
            }
        }
        if (count > 0) distill_block<T, Terms>(problem, soft, block_rows, count, RowLogits<T>{}, scratch, widened);
        widened.flush(problem);
        return;
    }
    // Longer rows stream in well enough by themselves, and fetching one more would push the first out of L2.
    const bool fetch_ahead = problem.classes * sizeof(T) <= long_row_bytes;
    const bool fetch_gradient_ahead = Terms::gradient && fetch_gradient<T>(problem.rows, problem.classes);
    auto logits = [&](std::size_t i) -> RowLogits<T> {
        const auto row = static_cast<std::ptrdiff_t>(i);
        return {problem.student + row * problem.student_stride, problem.teacher + row * problem.teacher_stride};
    };
    RowLosses<T, Terms> losses(problem, widened);
    RowMaxima<T> maxima;
    for (std::size_t i = begin; i < end; ++i) {
        if (is_ignored(problem, i)) {
            zero_ignored_row<T, Terms>(problem, i);
            continue;
        }
        RowsAhead<T> ahead;
        if (i + 1 < end) ahead.next = logits(i + 1);
        const std::size_t fetched = scan_in_exponentials ? i + 2 : i + 1;  // the one the next scan reads
        if (fetched < end && fetch_ahead) ahead.fetched = logits(fetched);
        if (fetched < end && fetch_gradient_ahead)
            ahead.fetched_gradient = problem.gradient + static_cast<std::ptrdiff_t>(fetched) * problem.gradient_stride;
        const auto row = static_cast<std::ptrdiff_t>(i);
        const std::int64_t class_index = problem.label_kind == LabelKind::class_indices
                                             ? problem.class_indices[row * problem.class_index_stride]
                                             : 0;
        T* gradient = Terms::gradient ? problem.gradient + row * problem.gradient_stride : nullptr;
        const T* target = Terms::distribution ? problem.targets + row * problem.target_stride : nullptr;
        const RowLogits<T> here = logits(i);
        GradientSize<double> size{};
        const RowSums<Terms> sums = distill_row<T, Terms>(problem, soft, here.student, here.teacher, class_index,
                                                          target, ahead, scratch, gradient, maxima, size);
        losses.add(i, sums, size);
    }
    losses.flush();
    widened.flush(problem);
}

// The instantiation of each run-time choice, in one table: rows_kernel_table<T>[gradient][soft][hard], where
// soft is the SoftTerm (mixture.hpp), and hard (then + 2 where e^(ds) is a power of e^(ds/T), see hard_power) is the
// LabelKind of a hard term (none: no hard term). Everything else a call chooses is a run-time value inside the kernels:
// each entry here is compiled in full, so the table is kept to the choices that change which passes run and what they
// sum.
template <class T, bool Gradient, class Soft, class Hard>
constexpr RowsKernel<T> rows_instance() noexcept {
    if constexpr (std::is_same_v<Soft, Absent> && std::is_same_v<Hard, Absent>) return nullptr;  // no loss at all
    else if constexpr (std::is_same_v<Soft, SparseKL>) return &run_sparse_rows_with<T, Terms<Soft, Hard, Gradient>>;
    else return &run_rows_with<T, Terms<Soft, Hard, Gradient>>;
}

// In the order of LabelKind: none, class_indices, distributions; then the last two with e^(ds) a power.
template <class T, bool Gradient, class Soft>
constexpr std::array<RowsKernel<T>, 5> by_hard_term() noexcept {
    // A hard term without a soft one computes its own e^(ds) (hard_power is 0 then).
    constexpr bool powered = !std::is_same_v<Soft, Absent>;
    return {rows_instance<T, Gradient, Soft, Absent>(), rows_instance<T, Gradient, Soft, CrossEntropy<false, false>>(),
            rows_instance<T, Gradient, Soft, CrossEntropy<true, false>>(),
            rows_instance<T, Gradient, Soft, CrossEntropy<false, powered>>(),
            rows_instance<T, Gradient, Soft, CrossEntropy<true, powered>>()};
}

// In the order of SoftTerm. A new divergence is its policy, an entry here and its case in soft_term.
static_assert(divergence_count == 5, "each Divergence needs its SoftTerm in soft_term (mixture.hpp)");
constexpr std::size_t soft_terms = 5;
template <class T, bool Gradient>
constexpr std::array<std::array<RowsKernel<T>, 5>, soft_terms> by_soft_term() noexcept {
    return {by_hard_term<T, Gradient, Absent>(), by_hard_term<T, Gradient, ForwardKL>(),
            by_hard_term<T, Gradient, ReverseKL>(), by_hard_term<T, Gradient, Mixture>(),
            by_hard_term<T, Gradient, SparseKL>()};
}

template <class T>
constexpr std::array<std::array<std::array<RowsKernel<T>, 5>, soft_terms>, 2> rows_kernel_table = {
    by_soft_term<T, false>(), by_soft_term<T, true>()};

// The row kernel for this problem's terms.
template <class T>
RowsKernel<T> rows_kernel(const BatchProblem<T>& problem) noexcept {
    // Soft and hard weights are 1 - alpha and alpha, so at least one term is always present.
    const auto soft = static_cast<std::size_t>(soft_term(problem));
    const LabelKind hard = problem.hard_weight != 0.0 ? problem.label_kind : LabelKind::none;
    const bool powered = hard != LabelKind::none && hard_power(soft != 0, problem.temperature) != 0;
    return rows_kernel_table<T>[problem.gradient != nullptr][soft][static_cast<std::size_t>(hard) + (powered ? 2 : 0)];
}

template <class T>
void run_rows(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    rows_kernel(problem)(problem, begin, end, scratch);
}

// Rows of a float problem computed again in double (redo_inexact_rows), widened_group(classes) at a time: their
// logits (and targets, labels) widened into `widened`, a problem of those rows for the double kernels, judged by
// float's tolerance, whose losses are copied to the float rows' and whose gradient rows are narrowed into theirs.
// The double kernels send the rows that need it on to the exact pass in double, as for a double call. Where float's
// kernels lose to rounding about an ulp of float (D from 1e-3 to 0.1, or the mixtures' near matches), this costs
// about 2.5 float rows instead of the exact pass's 20 or so; short rows go as a block of rows, as the double kernels
// take them.
template <class T>
void widened_rows(const BatchProblem<T>& problem, const std::size_t* rows, std::size_t count, T* widened) noexcept {
    static_assert(std::is_same_v<T, float>, "only float rows are computed again in double");
    const std::size_t n = problem.classes, group = widened_group(n);
    // Double objects in the scratch's storage, which the float kernels never touch (placement new: no code).
    double* const buffer = reinterpret_cast<double*>(widened);
    std::uninitialized_default_construct_n(buffer, widened_elements(n));
    double* const student = buffer;
    double* const teacher = student + group * n;
    double* const targets = teacher + group * n;
    double* const gradient = targets + group * n;
    double* const losses = gradient + group * n;
    double* const hard_losses = losses + group;
    auto* const labels = reinterpret_cast<std::int64_t*>(hard_losses + group);  // (int64 and double: 8 bytes)
    std::uninitialized_default_construct_n(labels, group);
    double* const scratch = hard_losses + 2 * group;

    BatchProblem<double> wide;
    wide.classes = n;
    wide.student = student;
    wide.student_stride = static_cast<std::ptrdiff_t>(n);
    wide.teacher = teacher;
    wide.teacher_stride = static_cast<std::ptrdiff_t>(n);
    wide.tail = problem.tail;
    wide.label_kind = problem.label_kind;
    wide.class_indices = labels;
    wide.ignore_index = problem.ignore_index;
    if (problem.label_kind == LabelKind::distributions) {
        wide.targets = targets;
        wide.target_stride = static_cast<std::ptrdiff_t>(n);
    }
    wide.divergence = problem.divergence;
    wide.beta = problem.beta;
    wide.skew = problem.skew;
    wide.temperature = problem.temperature;
    wide.soft_weight = problem.soft_weight;
    wide.hard_weight = problem.hard_weight;
    wide.gradient_scale = problem.gradient_scale;
    wide.row_losses = losses;
    wide.row_hard_losses = problem.row_hard_losses != nullptr ? hard_losses : nullptr;
    wide.gradient = problem.gradient != nullptr ? gradient : nullptr;
    wide.gradient_stride = static_cast<std::ptrdiff_t>(n);
    wide.float_tolerance = true;

    for (std::size_t first = 0; first < count; first += group) {
        const std::size_t size = count - first < group ? count - first : group;
        for (std::size_t k = 0; k < size; ++k) {
            const auto r = static_cast<std::ptrdiff_t>(rows[first + k]);
            const T* const student_row = problem.student + r * problem.student_stride;
            const T* const teacher_row = problem.teacher + r * problem.teacher_stride;
            for (std::size_t c = 0; c < n; ++c) student[k * n + c] = static_cast<double>(student_row[c]);
            for (std::size_t c = 0; c < n; ++c) teacher[k * n + c] = static_cast<double>(teacher_row[c]);
            if (problem.label_kind == LabelKind::distributions) {
                const T* const target_row = problem.targets + r * problem.target_stride;
                for (std::size_t c = 0; c < n; ++c) targets[k * n + c] = static_cast<double>(target_row[c]);
            }
            if (problem.label_kind == LabelKind::class_indices)
                labels[k] = problem.class_indices[r * problem.class_index_stride];
        }
        wide.rows = size;
        run_rows(wide, 0, size, scratch);
        for (std::size_t k = 0; k < size; ++k) {
            const std::size_t row = rows[first + k];
            problem.row_losses[row] = losses[k];
            if (problem.row_hard_losses != nullptr) problem.row_hard_losses[row] = hard_losses[k];
            if (problem.gradient == nullptr) continue;
            T* const gradient_row = problem.gradient + static_cast<std::ptrdiff_t>(row) * problem.gradient_stride;
            for (std::size_t c = 0; c < n; ++c) gradient_row[c] = static_cast<T>(gradient[k * n + c]);
        }
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
