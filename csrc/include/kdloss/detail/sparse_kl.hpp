#pragma once

// Forward KL against a sparse teacher (SparseTeacherView): a policy of terms.hpp for the student's side, and a
// driver of its own for the rows. For a row with listed classes K, their probabilities p_k, the student's
// q = softmax(s/T) over all C classes, and Q_u = sum of q over the classes not listed:
//   bucket:       D = sum_k p_k (log p_k - log q_k) + r (log r - log Q_u),  r = max(0, 1 - sum_k p_k),
//   renormalize:  D = sum_k p~_k (log p~_k - log q_k),                      p~ = p / sum_k p_k,
// the KL over the K + 1 bins (the listed classes and the rest), and over the listed classes alone. With
// pi the listed probabilities (p or p~), rho the tail (r or 0) and P = sum pi + rho, the gradient of T^2 D is
//   T (P q_j - pi_j) at a listed class,   T q_j (P - rho / Q_u) elsewhere.
// The dense passes (lane_math.hpp) take the student's maxima and exponentials, and write the second formula
// everywhere; the K listed classes, a few dozen of tens of thousands, are then computed in double one by one,
// as is D (listed_classes). Q_u is summed over the unlisted classes themselves, never as 1 - sum_k q_k, which
// would lose all of it where the listed classes hold nearly all of the student's mass.
//
// A row's slots have been checked (DistillationLoss): indices in [0, C), none listed twice, no NaN or +inf,
// probabilities summing to at most 1 + 1e-6. Every row is run on its own (no blocks of short rows: sparse
// teachers are for vocabularies of tens of thousands), one shorter than a Pack padded to one with -inf.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"
#include "kdloss/sparse_teacher.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

struct SparseKL {
    static constexpr bool second_pass = false;
    static constexpr bool dense_teacher = false;

    template <class V>
    struct Sums {
        V student_soft;  // Z_s, from the exponential pass
        V divergence;    // D, from the listed classes (listed_classes)
        V unlisted;      // P / Z_s - rho / Z_u (Z_u = Q_u Z_s): the gradient at an unlisted class over T e^(ds/T)

        static Sums neutral() noexcept { return {1.0, 0.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.student_soft...);
        f(sums.divergence...);
        f(sums.unlisted...);
    }

    template <class T>
    struct Partials {
        Pack<T> student_soft;

        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Pack<T>& ds, const Pack<T>&, const Pack<T>&, Exp2Scale<T> soft,
                                  const Skipped& skipped, const RowBuffers<T>& row) noexcept {
            const Pack<T> e_student = fast_exp2(ds, soft);
            e_student.store(row.student_soft + i);
            student_soft += summed(e_student, T(0), skipped);
            return e_student;
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.student_soft += widen(student_soft);
            student_soft = Pack<T>();
        }
    };

    template <class V>
    static KDLOSS_INLINE V divergence(const Sums<V>& sums, double) noexcept {
        return sums.divergence;
    }

    // The gradient's soft term at an unlisted class: weight T e^(ds/T) (P / Z_s - rho / Z_u). Its factor may be
    // beyond float's range where Z_u is tiny (every unlisted class then has e^(ds/T) <= Z_u, and the product is
    // at most T rho): it is applied as two, the second a power of 2.
    template <class T>
    struct Coefficients {
        Pack<T> scale, power_of_two;

        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double weight, double temperature) noexcept {
            const double factor = weight * temperature * sums.unlisted;
            const double split = std::fabs(factor) > 0x1p100 ? 0x1p64 : 1.0;
            return {Pack<T>(static_cast<T>(factor / split)), Pack<T>(static_cast<T>(split))};
        }

        KDLOSS_INLINE Pack<T> gradient(std::size_t, const Pack<T>& e_student, const RowBuffers<T>&) const noexcept {
            return (scale * e_student) * power_of_two;
        }
    };
};

// A row's sum of n >= lanes elements, in double.
template <class T>
double row_sum(const T* values, std::size_t n) noexcept {
    Pack<double> total{};
    const std::size_t whole = n - n % lanes;
    for (std::size_t i = 0; i < whole; i += lanes) total += widen(Pack<T>::load(values + i));
    double sum = total.sum();
    for (std::size_t i = whole; i < n; ++i) sum += static_cast<double>(values[i]);
    return sum;
}

// What the listed classes give a row: D into sums.divergence, the unlisted classes' gradient factor into
// sums.unlisted. `student` is the row's logits, `row_max` their maximum, `exponentials` their e^(ds/T), of which
// the listed classes' are set to 0 here (the gradient pass then leaves them to write_listed).
template <class T>
void listed_classes(const BatchProblem<T>& problem, std::size_t row, const T* student, T row_max, T* exponentials,
                    std::size_t n, SparseKL::Sums<double>& sums) noexcept {
    const SparseTeacherView& teacher = *problem.sparse;
    const double temperature = problem.temperature, z_student = sums.student_soft;
    const double log_z_student = std::log(z_student);
    // log of the listed probabilities' sum, by log-sum-exp, so that the tail 1 - sum is as exact as the
    // log-probabilities make it.
    double max_logprob = -std::numeric_limits<double>::infinity();
    std::size_t listed = 0;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob == -std::numeric_limits<double>::infinity()) continue;
        max_logprob = std::max(max_logprob, logprob);
        ++listed;
    }
    double scaled_sum = 0.0;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob != -std::numeric_limits<double>::infinity()) scaled_sum += std::exp(logprob - max_logprob);
    }
    const double log_sum = listed == 0 ? -std::numeric_limits<double>::infinity() : max_logprob + std::log(scaled_sum);
    const bool renormalize = problem.tail == Tail::renormalize;
    // The tail: none where every class is listed (whatever rounding left of 1), nor for a renormalised row.
    const double tail = renormalize || listed == problem.classes || log_sum >= 0.0 ? 0.0 : -std::expm1(log_sum);
    const double shift = renormalize ? log_sum : 0.0;  // log pi = log p - shift

    double divergence = 0.0;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob == -std::numeric_limits<double>::infinity()) continue;
        const auto c = static_cast<std::size_t>(teacher.index(row, k));
        const double log_pi = logprob - shift;
        const double pi = std::exp(log_pi);
        const double log_q =
            (static_cast<double>(student[c]) - static_cast<double>(row_max)) / temperature - log_z_student;
        if (pi > 0.0) divergence += pi * (log_pi - log_q);
        exponentials[c] = T(0);
    }
    // The unlisted classes' e^(ds/T), summed without the listed ones (now 0).
    const double z_unlisted = row_sum(exponentials, n);
    if (tail > 0.0) divergence += tail * (std::log(tail) - (std::log(z_unlisted) - log_z_student));
    const double total = renormalize ? (listed == 0 ? 0.0 : 1.0) : tail > 0.0 ? 1.0 : std::exp(log_sum);
    sums.divergence = divergence;
    sums.unlisted = total / z_student - (tail > 0.0 ? tail / z_unlisted : 0.0);
}

// The gradient at the listed classes of a row whose other classes write_gradient has written, before the
// label's term is subtracted: soft_scale T (P q_j - pi_j) and the hard term's h_scale e^(ds_j) - y_scale y_j,
// in double.
template <class T, class Terms>
void write_listed(const BatchProblem<T>& problem, std::size_t row, const T* student, T row_max, const T* target,
                  const typename Terms::template Sums<double>& sums, T* gradient) noexcept {
    const SparseTeacherView& teacher = *problem.sparse;
    const double temperature = problem.temperature;
    const double soft_scale = problem.gradient_scale * problem.soft_weight * temperature;
    const double z_student = sums.soft.student_soft;
    // P and the shift of log pi, as listed_classes found them: P / Z_s is sums.unlisted without its tail part.
    double max_logprob = -std::numeric_limits<double>::infinity(), scaled_sum = 0.0;
    std::size_t listed = 0;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob == -std::numeric_limits<double>::infinity()) continue;
        max_logprob = std::max(max_logprob, logprob);
        ++listed;
    }
    if (listed == 0) return;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob != -std::numeric_limits<double>::infinity()) scaled_sum += std::exp(logprob - max_logprob);
    }
    const double log_sum = max_logprob + std::log(scaled_sum);
    const bool renormalize = problem.tail == Tail::renormalize;
    const bool has_tail = !renormalize && listed != problem.classes && log_sum < 0.0;
    const double total = renormalize || has_tail ? 1.0 : std::exp(log_sum);
    const double shift = renormalize ? log_sum : 0.0;
    double hard_scale = 0.0, target_scale = 0.0;
    if constexpr (Terms::hard) {
        target_scale = hard_gradient_scale(problem);
        hard_scale = target_scale * sums.hard.target_mass / sums.hard.student_hard;
    }
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob == -std::numeric_limits<double>::infinity()) continue;
        const auto c = static_cast<std::size_t>(teacher.index(row, k));
        const double ds = static_cast<double>(student[c]) - static_cast<double>(row_max);
        const double q = std::exp(ds / temperature) / z_student;
        double g = soft_scale * (total * q - std::exp(logprob - shift));
        if constexpr (Terms::hard) {
            g += hard_scale * std::exp(ds);
            if constexpr (Terms::distribution) g -= target_scale * static_cast<double>(target[c]);
        }
        gradient[c] = static_cast<T>(g);
    }
}

// Rows [begin, end) of a problem with a sparse teacher and a soft term.
template <class T, class Terms>
void run_sparse_rows_with(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    static_assert(Terms::soft && !Terms::SoftTerm::dense_teacher);
    const Exp2Scale<T> soft = soft_exponent<T>(problem.temperature);
    const std::size_t classes = problem.classes;
    // A row shorter than a Pack runs padded to one: its logits with -inf, its targets with 0.
    const bool padded = classes < lanes;
    const std::size_t n = padded ? lanes : classes;
    T* padded_student = scratch;
    T* padded_target = scratch + n;
    T* padded_gradient = scratch + 2 * n;
    T* buffers = padded ? scratch + 3 * n : scratch;
    for (std::size_t i = begin; i < end; ++i) {
        if (is_ignored(problem, i)) {
            zero_ignored_row<T, Terms>(problem, i);
            continue;
        }
        const auto row_offset = static_cast<std::ptrdiff_t>(i);
        const T* student = problem.student + row_offset * problem.student_stride;
        const T* target = Terms::distribution ? problem.targets + row_offset * problem.target_stride : nullptr;
        T* gradient = Terms::gradient ? problem.gradient + row_offset * problem.gradient_stride : nullptr;
        if (padded) {
            std::fill(padded_student, padded_student + n, -std::numeric_limits<T>::infinity());
            std::copy(student, student + classes, padded_student);
            student = padded_student;
            if constexpr (Terms::distribution) {
                std::fill(padded_target, padded_target + n, T(0));
                std::copy(target, target + classes, padded_target);
                target = padded_target;
            }
        }
        T* row_gradient = Terms::gradient ? (padded ? padded_gradient : gradient) : nullptr;
        // The student's exponentials in the gradient's row, as distill_row keeps them.
        T* student_soft = Terms::gradient ? row_gradient : buffers;
        const RowBuffers<T> row{student_soft, nullptr, buffers + n, target, hard_power(true, problem.temperature)};

        const T row_max = lane_maxima<T, false>(student, nullptr, n).student.max();
        typename Terms::template Sums<Pack<double>> lane_sums;
        exponentials<T, typename Terms::without_gradient>(student, nullptr, Pack<T>(row_max), Pack<T>(), soft, row, n,
                                                          RowsAhead<T>{}, lane_sums);
        typename Terms::template Sums<double> sums;
        for_each_sum<Terms>([](double& sum, const Pack<double>& lane_sum) { sum = lane_sum.sum(); }, sums, lane_sums);
        std::int64_t class_index = 0;
        if constexpr (Terms::class_index) {
            class_index = problem.class_indices[row_offset * problem.class_index_stride];
            Terms::HardTerm::at_label(sums.hard,
                                      static_cast<double>(student[class_index]) - static_cast<double>(row_max));
        }
        listed_classes(problem, i, student, row_max, student_soft, n, sums.soft);

        if (problem.row_hard_losses == nullptr) {
            problem.row_losses[i] =
                loss_from_sums<Terms>(sums, problem.temperature, problem.soft_weight, problem.hard_weight);
        } else {
            loss_parts_from_sums<Terms>(sums, problem.temperature, problem.row_losses[i], problem.row_hard_losses[i]);
        }
        if constexpr (Terms::gradient) {
            const auto coefficients = GradientCoefficients<T, Terms>::from_sums(sums, problem);
            write_gradient<T, Terms>(row_gradient, row, coefficients, n, RowLogits<T>{});
            write_listed<T, Terms>(problem, i, student, row_max, target, sums, row_gradient);
            if constexpr (Terms::class_index) row_gradient[class_index] -= coefficients.hard.label_scale;
            if (padded) std::copy(row_gradient, row_gradient + classes, gradient);
        }
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
