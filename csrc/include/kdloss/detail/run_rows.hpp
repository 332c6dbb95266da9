#pragma once

// A range of rows of a validated BatchProblem: the function that the dispatcher and the thread pool call.
// Which terms exist is decided here, once per call, and baked into the row kernels as template arguments.

#include <cstddef>
#include <cstdint>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/row_kernel.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class T, class Terms>
void zero_ignored_row(const BatchProblem<T>& problem, std::size_t i) noexcept {
    problem.row_losses[i] = 0.0;
    if constexpr (Terms::gradient) {
        T* gradient = problem.gradient + static_cast<std::ptrdiff_t>(i) * problem.gradient_stride;
        for (std::size_t c = 0; c < problem.classes; ++c) gradient[c] = T(0);
    }
}

template <class T>
bool is_ignored(const BatchProblem<T>& problem, std::size_t i) noexcept {
    return problem.label_kind == LabelKind::class_indices &&
           problem.class_indices[static_cast<std::ptrdiff_t>(i) * problem.class_index_stride] == problem.ignore_index;
}

// Long rows' losses from their sums, `lanes` rows at a time: one row per lane of loss_from_sums, as in a block.
template <class Terms>
class RowLosses {
public:
    template <class T>
    explicit RowLosses(const BatchProblem<T>& problem) noexcept
        : row_losses_(problem.row_losses),
          temperature_(problem.temperature),
          soft_weight_(problem.soft_weight),
          hard_weight_(problem.hard_weight) {
        const RowSums neutral;
        for (std::size_t k = 0; k < lanes; ++k) put(k, 0, neutral);
    }

    void add(std::size_t row, const RowSums& sums) noexcept {
        put(count_, row, sums);
        if (++count_ == lanes) flush();
    }

    // Writes the losses of the rows added since the last flush.
    void flush() noexcept {
        if (count_ == 0) return;
        // Lanes past count_ hold an earlier row's sums, or neutral ones: computed and dropped.
        Sums<Pack<double>> sums;
        for_each_sum([](Pack<double>& sum, const Column& column) { sum = Pack<double>::load(column); }, sums, columns_);
        const Pack<double> loss =
            loss_from_sums<Terms>(sums, Pack<double>::load(target_logit_), temperature_, soft_weight_, hard_weight_);
        double losses[lanes];
        loss.store(losses);
        for (std::size_t k = 0; k < count_; ++k) row_losses_[rows_[k]] = losses[k];
        count_ = 0;
    }

private:
    using Column = double[lanes];  // one sum of `lanes` rows, loaded as one Pack

    void put(std::size_t k, std::size_t row, const RowSums& sums) noexcept {
        rows_[k] = row;
        for_each_sum([k](Column& column, double sum) { column[k] = sum; }, columns_, sums);
        target_logit_[k] = sums.target_logit;
    }

    double* row_losses_;
    double temperature_, soft_weight_, hard_weight_;
    std::size_t count_ = 0;
    std::size_t rows_[lanes];
    Sums<Column> columns_;
    double target_logit_[lanes];
};

template <class T, class Terms, int HardPower>
void run_rows_with(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    const Exp2Scale<T> soft = soft_exponent<T>(problem.temperature);
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
                distill_block<T, Terms, HardPower>(problem, soft, block_rows, count, next_rows(i + 1), scratch);
                count = 0;
            }
        }
        if (count > 0) distill_block<T, Terms, HardPower>(problem, soft, block_rows, count, RowLogits<T>{}, scratch);
        return;
    }
    // Longer rows stream in well enough by themselves, and fetching one more would push the first out of L2.
    const bool fetch_ahead = problem.classes * sizeof(T) <= long_row_bytes;
    const bool fetch_gradient_ahead = Terms::gradient && fetch_gradient<T>(problem.rows, problem.classes);
    auto logits = [&](std::size_t i) -> RowLogits<T> {
        const auto row = static_cast<std::ptrdiff_t>(i);
        return {problem.student + row * problem.student_stride, problem.teacher + row * problem.teacher_stride};
    };
    RowLosses<Terms> losses(problem);
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
        losses.add(i, distill_row<T, Terms, HardPower>(problem, soft, here.student, here.teacher, class_index, target,
                                                       ahead, scratch, gradient, maxima));
    }
    losses.flush();
}

template <class T, class Terms>
void run_rows_choosing_power(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    // The hard exponential is a power of the soft one for small integer temperatures (see soft_power).
    const double temperature = problem.temperature;
    if constexpr (Terms::soft && Terms::hard) {
        if (temperature == 1.0) return run_rows_with<T, Terms, 1>(problem, begin, end, scratch);
        if (temperature == 2.0) return run_rows_with<T, Terms, 2>(problem, begin, end, scratch);
        if (temperature == 3.0) return run_rows_with<T, Terms, 3>(problem, begin, end, scratch);
        if (temperature == 4.0) return run_rows_with<T, Terms, 4>(problem, begin, end, scratch);
    }
    run_rows_with<T, Terms, 0>(problem, begin, end, scratch);
}

template <class T, bool Gradient>
void run_rows_choosing_terms(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    const bool labelled = problem.label_kind != LabelKind::none;
    const bool soft = problem.soft_weight != 0.0;
    const bool hard = labelled && problem.hard_weight != 0.0;
    const bool distribution = problem.label_kind == LabelKind::distributions;
    // Soft and hard weights are 1 - alpha and alpha, so at least one term is always present.
    if (soft && hard && distribution)
        run_rows_choosing_power<T, Terms<true, true, true, Gradient>>(problem, begin, end, scratch);
    else if (soft && hard) run_rows_choosing_power<T, Terms<true, true, false, Gradient>>(problem, begin, end, scratch);
    else if (soft) run_rows_choosing_power<T, Terms<true, false, false, Gradient>>(problem, begin, end, scratch);
    else if (distribution) run_rows_choosing_power<T, Terms<false, true, true, Gradient>>(problem, begin, end, scratch);
    else run_rows_choosing_power<T, Terms<false, true, false, Gradient>>(problem, begin, end, scratch);
}

template <class T>
void run_rows(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    if (problem.gradient != nullptr) run_rows_choosing_terms<T, true>(problem, begin, end, scratch);
    else run_rows_choosing_terms<T, false>(problem, begin, end, scratch);
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
