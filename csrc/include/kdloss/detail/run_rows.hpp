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

template <class T, class Terms, int HardPower>
void run_rows_with(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    if (problem.classes <= block_max_classes) {
        // Short rows: gather up to `lanes` counted rows at a time into one block.
        std::size_t block_rows[lanes];
        std::size_t count = 0;
        for (std::size_t i = begin; i < end; ++i) {
            if (is_ignored(problem, i)) {
                zero_ignored_row<T, Terms>(problem, i);
                continue;
            }
            block_rows[count++] = i;
            if (count == lanes) {
                distill_block<T, Terms, HardPower>(problem, block_rows, count, scratch);
                count = 0;
            }
        }
        if (count > 0) distill_block<T, Terms, HardPower>(problem, block_rows, count, scratch);
        return;
    }
    // Rows of up to 64 KiB are fetched a row ahead (NextRow); longer ones stream in well enough by themselves,
    // and fetching a second one would only push the first out of L2.
    const bool fetch_ahead = problem.classes * sizeof(T) <= 65536;
    for (std::size_t i = begin; i < end; ++i) {
        if (is_ignored(problem, i)) {
            zero_ignored_row<T, Terms>(problem, i);
            continue;
        }
        const auto row = static_cast<std::ptrdiff_t>(i);
        NextRow<T> next;
        if (fetch_ahead && i + 1 < end)
            next = {problem.student + (row + 1) * problem.student_stride,
                    problem.teacher + (row + 1) * problem.teacher_stride};
        const std::int64_t class_index =
            problem.label_kind == LabelKind::class_indices ? problem.class_indices[row * problem.class_index_stride] : 0;
        T* gradient = Terms::gradient ? problem.gradient + row * problem.gradient_stride : nullptr;
        const T* target = Terms::distribution ? problem.targets + row * problem.target_stride : nullptr;
        problem.row_losses[i] = distill_row<T, Terms, HardPower>(problem, problem.student + row * problem.student_stride,
                                                                 problem.teacher + row * problem.teacher_stride,
                                                                 class_index, target, next, scratch, gradient);
    }
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
    else if (soft && hard)
        run_rows_choosing_power<T, Terms<true, true, false, Gradient>>(problem, begin, end, scratch);
    else if (soft)
        run_rows_choosing_power<T, Terms<true, false, false, Gradient>>(problem, begin, end, scratch);
    else if (distribution)
        run_rows_choosing_power<T, Terms<false, true, true, Gradient>>(problem, begin, end, scratch);
    else
        run_rows_choosing_power<T, Terms<false, true, false, Gradient>>(problem, begin, end, scratch);
}

template <class T>
void run_rows(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    if (problem.gradient != nullptr)
        run_rows_choosing_terms<T, true>(problem, begin, end, scratch);
    else
        run_rows_choosing_terms<T, false>(problem, begin, end, scratch);
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
