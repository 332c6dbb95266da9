#pragma once

// The two drivers of lane_math.hpp.
//
// distill_row: one long row (more than block_max_classes<T> >= lanes classes), spread over the lanes. Two
// passes over the row and one over its exponentials: (1) the maxima; (2) the exponentials, with their
// sums; (3) the gradient, written once; (2) or (3) runs the next row's pass (1) in its loop. A divergence
// with a second pass (mixture.hpp) runs it over the exponentials between (2) and (3). The student's
// exponentials are kept in the gradient's row until (3) writes over them, the others in per-thread scratch.
// A row's loss waits for fifteen more rows' (RowLosses, run_rows.hpp).
//
// distill_block: up to `lanes` short rows at once. Rows of ten or a hundred classes are too short to fill
// vectors or to pay for three logarithms each, so a block of rows is transposed into scratch (one row per
// lane), run through the same passes, and the gradient transposed back.

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/exact_row.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/top_entry.hpp"
#include "kdloss/detail/transpose.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// A long row's sums, from which its loss is computed later, `lanes` rows at once (RowLosses in run_rows.hpp):
// its logarithms and divisions cost as much for one row as for sixteen.
template <class Terms>
using RowSums = typename Terms::template Sums<double>;

// What a nearly one-hot row's top entry, taken from the others (top_entry.hpp), is rounded relative to beyond their
// magnitudes: what the soft term's entries share, and the hard term's largest (the labels' y among them); lane by
// lane for a block's rows, in every lane for one row's (V = double).
template <class T, class Terms, class V>
KDLOSS_INLINE Pack<T> shared_terms(const typename Terms::template Sums<V>& sums,
                                   const GradientCoefficients<T, Terms>& k) noexcept {
    const Pack<T> soft = Terms::SoftTerm::template shared_terms<T>(sums.soft, k.soft);
    if constexpr (Terms::hard) return soft + k.hard.size;
    else return soft;
}

// A block's nearly one-hot rows' top entries (top_entry.hpp), once the block's gradient rows[0 .. count) are written:
// each is then a scalar store that no Pack load waits for. Their GradientSize in `size`.
template <class T, class Terms>
void set_block_top_entries(const BatchProblem<T>& problem, const typename Terms::template Sums<Pack<double>>& sums,
                           const GradientCoefficients<T, Terms>& k, const T* const* student_rows,
                           const Pack<T>& student_max, T* const* gradient_rows, std::size_t count,
                           GradientSize<Pack<T>>& size) noexcept {
    // (Lanes past `count` repeat the first row: one of them is one-hot only where a row is.)
    const Pack<double> one_hot_lanes =
        select(Terms::SoftTerm::template nearly_one_hot<T>(sums.soft), Pack<double>(1.0), Pack<double>(0.0));
    if (one_hot_lanes.sum() == 0.0) return;
    double one_hot[lanes];
    one_hot_lanes.store(one_hot);
    T largest[lanes], terms[lanes], shared[lanes], maxima[lanes];
    shared_terms<T, Terms>(sums, k).store(shared);
    size.largest.store(largest);
    size.terms.store(terms);
    student_max.store(maxima);
    const std::size_t n = problem.classes;
    for (std::size_t lane = 0; lane < count; ++lane) {
        if (one_hot[lane] == 0.0) continue;
        GradientSize<double> row_size;
        set_top_entry(gradient_rows[lane], n, top_class(student_rows[lane], n, maxima[lane]), shared[lane], row_size);
        largest[lane] = static_cast<T>(row_size.largest);
        terms[lane] = static_cast<T>(row_size.terms);
    }
    size = {Pack<T>::load(largest), Pack<T>::load(terms)};
}

// Lane maxima found ahead of their row (by a pass of the row before), and the row they are of.
template <class T>
struct RowMaxima {
    LaneMaxima<T> lanes;
    RowLogits<T> row;  // null: none found
};

// One long row. The rows ahead of it are touched on the way (RowsAhead): the next one's maxima are left
// in `maxima` for its turn. `soft` is soft_exponent(T), worked out once per call: its two divisions would
// otherwise hold up the start of every row's exponentials. With a gradient, its soft part's GradientSize is left
// in `size`.
template <class T, class Terms>
KDLOSS_NOINLINE RowSums<Terms> distill_row(const BatchProblem<T>& problem, Exp2Scale<T> soft, const T* student,
                                           const T* teacher, std::int64_t class_index, const T* target,
                                           RowsAhead<T> ahead, T* scratch, T* gradient, RowMaxima<T>& maxima,
                                           GradientSize<double>& size) noexcept {
    const std::size_t n = problem.classes;
    // The student's exponentials in the gradient's row, where there is one: a row's passes then touch a fifth
    // less memory.
    T* student_soft = Terms::gradient ? gradient : scratch;
    T* teacher_soft = Terms::gradient ? scratch : scratch + n;
    const RowBuffers<T> row{student_soft,
                            teacher_soft,
                            teacher_soft + n,
                            target,
                            hard_power(Terms::soft, problem.temperature),
                            keeps_logit_difference(problem) ? teacher_soft + 2 * n : nullptr};

    const LaneMaxima<T> lane_max = maxima.row.student == student && maxima.row.teacher == teacher
                                       ? maxima.lanes
                                       : lane_maxima<T, Terms::soft>(student, teacher, n);
    const T row_student_max = lane_max.student.max();
    const Pack<T> student_max(row_student_max), teacher_max(lane_max.teacher.max());

    typename Terms::template Sums<Pack<double>> lane_sums;
    const LaneMaxima<T> scanned = exponentials<T, typename Terms::without_gradient>(
        student, teacher, student_max, teacher_max, soft, row, n, ahead, lane_sums);
    maxima.row = {};
    if constexpr (scan_in_exponentials) maxima = {scanned, ahead.next};

    RowSums<Terms> sums;
    for_each_sum<Terms>([](double& sum, const Pack<double>& lane_sum) { sum = lane_sum.sum(); }, sums, lane_sums);
    if constexpr (Terms::class_index) {
        Terms::HardTerm::at_label(sums.hard,
                                  static_cast<double>(student[class_index]) - static_cast<double>(row_student_max));
        if constexpr (std::is_same_v<T, double>) Terms::HardTerm::count_maxima_apart(sums.hard, row, n);
    }
    if constexpr (Terms::second_pass) {
        using Soft = typename Terms::SoftTerm;
        typename Soft::template Sums<Pack<double>> more{};
        Soft::template with_second_pass<T, Terms::gradient>(
            sums.soft, problem, [&](const auto& pass) { second_pass<T, Soft, Terms::gradient>(row, n, pass, more); });
        Soft::for_each_sum([](double& sum, const Pack<double>& lane_sum) { sum += lane_sum.sum(); }, sums.soft, more);
    }

    if constexpr (Terms::gradient) {
        const auto coefficients = GradientCoefficients<T, Terms>::from_sums(sums, problem);
        GradientSize<Pack<T>> lane_size;
        const RowLogits<T> next = scan_in_exponentials ? RowLogits<T>{} : ahead.next;
        // A class index alone at the student's top needs the pass's at_top; elsewhere it is h_scale, and a pass
        // without its selection is 2-3% faster on long rows.
        bool at_top = true;
        if constexpr (Terms::class_index) at_top = coefficients.hard.row_label_alone_at_top();
        const LaneMaxima<T> found =
            at_top ? write_gradient<T, Terms>(gradient, row, coefficients, n, next, &lane_size)
                   : write_gradient<T, Terms, false, false>(gradient, row, coefficients, n, next, &lane_size);
        if constexpr (!scan_in_exponentials) maxima = {found, ahead.next};
        size = {static_cast<double>(lane_size.largest.max()), static_cast<double>(lane_size.terms.max())};
        if constexpr (Terms::class_index) {
            // The pass saw the label's entry before its y: where it was the largest, the others' is needed.
            const T before = gradient[class_index];
            gradient[class_index] -= coefficients.hard.label_scale[0];
            if constexpr (Terms::soft && Terms::exact_rows) {
                const double after = std::fabs(static_cast<double>(gradient[class_index]));
                size.largest = std::fabs(before) >= size.largest
                                   ? static_cast<double>(largest_magnitude(gradient, n).max())
                                   : std::fmax(size.largest, after);
            }
        }
        if constexpr (Terms::top_from_others) {
            if (Terms::SoftTerm::template nearly_one_hot<T>(sums.soft))
                set_top_entry(gradient, n, top_class(student, n, row_student_max),
                              static_cast<double>(shared_terms<T, Terms>(sums, coefficients)[0]), size);
        }
    }
    return sums;
}

// The rows rows[0 .. count), count <= lanes, none of them ignored: a lane per row. `soft` as for distill_row.
// `next`, if not null, is where the next block's logits start, lanes x classes contiguous elements of each
// input, which the exponential pass fetches into cache on the way. Rows to be computed again in double wait in
// `widened` (redo_inexact_rows).
template <class T, class Terms>
KDLOSS_NOINLINE void distill_block(const BatchProblem<T>& problem, Exp2Scale<T> soft, const std::size_t* rows,
                                   std::size_t count, RowLogits<T> next, T* scratch, WidenedRows<T>& widened) noexcept {
    const std::size_t n = problem.classes;
    const std::size_t m = lanes * n;
    // Each pass writes over what the one before read at the same place, so that a block takes as little
    // of L1 as it can: the exponentials over the logits, the gradient over the student's exponentials.
    T* student = scratch;
    T* teacher = scratch + m;
    T* target = scratch + 2 * m;
    const RowBuffers<T> row{student,
                            teacher,
                            scratch + 3 * m,
                            target,
                            hard_power(Terms::soft, problem.temperature),
                            keeps_logit_difference(problem) ? scratch + 4 * m : nullptr};
    T* gradient = row.student_soft;

    // Lanes past `count` repeat the first row: real data, computed and then dropped, so that the copy
    // below needs no condition. (Every lane of these arrays is written, none zeroed first: GCC zeroes a
    // 16-entry array with rep stos, whose start-up was 4% of a float32 call of 4096 rows of 10 classes.)
    std::int64_t class_index[lanes];
    const T* student_rows[lanes];
    const T* teacher_rows[lanes];
    const T* target_rows[lanes];
    for (std::size_t lane = 0; lane < lanes; ++lane) {
        const auto row_index = static_cast<std::ptrdiff_t>(rows[lane < count ? lane : 0]);
        student_rows[lane] = problem.student + row_index * problem.student_stride;
        teacher_rows[lane] = Terms::soft ? problem.teacher + row_index * problem.teacher_stride : nullptr;
        target_rows[lane] = Terms::distribution ? problem.targets + row_index * problem.target_stride : nullptr;
        class_index[lane] = Terms::class_index ? problem.class_indices[row_index * problem.class_index_stride] : 0;
    }
    const Pack<T> student_max = rows_to_lanes(student_rows, n, student);
    Pack<T> teacher_max;
    if constexpr (Terms::soft) teacher_max = rows_to_lanes(teacher_rows, n, teacher);
    if constexpr (Terms::distribution) rows_to_lanes(target_rows, n, target);

    double label_logits[lanes] = {};
    std::size_t label_at[lanes] = {};  // each lane's label's element in the block
    BlockLabels<T> labels;
    if constexpr (Terms::class_index) {
        T maxima[lanes];
        student_max.store(maxima);
        for (std::size_t lane = 0; lane < lanes; ++lane) {
            label_at[lane] = static_cast<std::size_t>(class_index[lane]) * lanes + lane;
            label_logits[lane] = static_cast<double>(student[label_at[lane]]) - static_cast<double>(maxima[lane]);
            labels.classes[lane] = static_cast<T>(class_index[lane]);
        }
    }
    typename Terms::template Sums<Pack<double>> sums;
    exponentials<T, typename Terms::without_gradient>(student, teacher, student_max, teacher_max, soft, row, m,
                                                      RowsAhead<T>{{}, next}, sums);
    if constexpr (Terms::second_pass) {
        using Soft = typename Terms::SoftTerm;
        Soft::template with_second_pass<T, Terms::gradient>(sums.soft, problem, [&](const auto& pass) {
            second_pass<T, Soft, Terms::gradient>(row, m, pass, sums.soft);
        });
    }
    if constexpr (Terms::class_index) {
        Terms::HardTerm::at_label(sums.hard, Pack<double>::load(label_logits));
        if constexpr (std::is_same_v<T, double>) Terms::HardTerm::count_maxima_apart(sums.hard, row, m);
    }
    const Pack<double> divergence = store_row_losses<Terms>(problem, sums, rows, count);

    GradientSize<Pack<T>> size;
    if constexpr (Terms::gradient) {
        const auto coefficients = GradientCoefficients<T, Terms>::from_sums(sums, problem);
        if constexpr (Terms::class_index)
            labels.entries = coefficients.hard.label_entries(Terms::HardTerm::hard_exponentials_at(row, label_at));
        write_gradient<T, Terms, Terms::class_index>(gradient, row, coefficients, m, RowLogits<T>{}, &size, &labels);
        T* gradient_rows[lanes];  // as the inputs' rows: lanes past `count` the first row's, and never written
        for (std::size_t lane = 0; lane < lanes; ++lane)
            gradient_rows[lane] =
                problem.gradient + static_cast<std::ptrdiff_t>(rows[lane < count ? lane : 0]) * problem.gradient_stride;
        lanes_to_rows(gradient, n, gradient_rows, count);
        if constexpr (Terms::top_from_others)
            set_block_top_entries<T, Terms>(problem, sums, coefficients, student_rows, student_max, gradient_rows,
                                            count, size);
    }
    redo_inexact_rows<Terms>(problem, sums, divergence, rows, count, widened, Terms::gradient ? &size : nullptr);
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
