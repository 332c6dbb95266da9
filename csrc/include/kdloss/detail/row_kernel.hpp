#pragma once

// The distillation loss and gradient of one long row of logits.
//
// For student logits s, teacher logits t, temperature T, q = softmax(s/T), p = softmax(t/T), h = softmax(s),
// and centred logits ds = s - max s, dt = t - max t:
//   soft = T^2 KL(p || q) = T^2 [ sum_c p_c (dt_c - ds_c) / T  - log Z_t + log Z_s ]
//   hard = -sum_c y_c log h_c = sum(y) log Z_h - sum_c y_c ds_c
//   d soft / d s = T (q - p),   d hard / d s = h sum(y) - y
// where Z_s, Z_t, Z_h are the sums of exp(ds/T), exp(dt/T), exp(ds). No logarithm of a probability is
// taken, so no epsilon is needed: exact zeros (from -inf logits or underflow) stay exact, and the products
// 0 * (-inf) that the formulas meet at them are masked to the mathematically right 0.
//
// Two passes over the row and one over scratch: (1) the maxima; (2) the exponentials, kept in per-thread
// scratch, with their sums and the loss terms; (3) the gradient, written once. Each loop is over contiguous
// data with no branch and no call the compiler cannot inline, so it vectorises; which terms exist is
// decided once per call through template parameters.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/simd_math.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// Which terms a call has, fixed at compile time so that every loop below is branch-free.
template <bool Soft, bool Hard, bool Distribution, bool Gradient>
struct Terms {
    static constexpr bool soft = Soft;
    static constexpr bool hard = Hard;
    static constexpr bool distribution = Distribution;  // hard term against a target distribution
    static constexpr bool gradient = Gradient;
};

// Runs body(c, lane) for c = 0 .. n-1 with lane = c % row_lanes, a block of row_lanes at a time. Sums and
// maxima kept in per-lane arrays then vectorise as plain element-wise operations, which the compiler may
// do without being allowed to reassociate floating-point sums; lanes are combined in a fixed order, so
// results never depend on the vector width the compiler chose.
constexpr std::size_t row_lanes = 16;

template <class Body>
inline void for_each_lane(std::size_t n, Body&& body) noexcept {
    std::size_t c = 0;
    for (; c + row_lanes <= n; c += row_lanes)
        for (std::size_t lane = 0; lane < row_lanes; ++lane) body(c + lane, lane);
    for (std::size_t lane = 0; c + lane < n; ++lane) body(c + lane, lane);
}

// for_each_lane, calling flush() after every BlocksPerFlush blocks and at the end: float partial sums of a
// few hundred terms are exact to a few ulps, and flushing them into double totals keeps rows of any length
// accurate at a fraction of the cost of widening every element.
template <std::size_t BlocksPerFlush, class Body, class Flush>
inline void for_each_lane_flushing(std::size_t n, Body&& body, Flush&& flush) noexcept {
    std::size_t c = 0;
    std::size_t blocks = 0;
    for (; c + row_lanes <= n; c += row_lanes) {
        for (std::size_t lane = 0; lane < row_lanes; ++lane) body(c + lane, lane);
        if (++blocks == BlocksPerFlush) {
            flush();
            blocks = 0;
        }
    }
    for (std::size_t lane = 0; c + lane < n; ++lane) body(c + lane, lane);
    flush();
}

template <class T>
struct alignas(64) Lanes {
    T value[row_lanes];

    explicit Lanes(T initial) noexcept {
        for (std::size_t lane = 0; lane < row_lanes; ++lane) value[lane] = initial;
    }
    T sum() const noexcept {
        T total = T(0);
        for (std::size_t lane = 0; lane < row_lanes; ++lane) total += value[lane];
        return total;
    }
    T max() const noexcept {
        T result = value[0];
        for (std::size_t lane = 1; lane < row_lanes; ++lane) result = value[lane] > result ? value[lane] : result;
        return result;
    }
};

template <class T>
struct RowMaxima {
    T student;
    T teacher;
};

// Starts at -inf so that an all -inf row yields -inf, and then NaN: its softmax is undefined.
template <class T, bool WithTeacher>
RowMaxima<T> row_maxima(const T* student, const T* teacher, std::size_t n) noexcept {
    Lanes<T> student_max(-std::numeric_limits<T>::infinity());
    Lanes<T> teacher_max(-std::numeric_limits<T>::infinity());
    for_each_lane(n, [&](std::size_t c, std::size_t lane) {
        T& s = student_max.value[lane];
        s = student[c] > s ? student[c] : s;
        if constexpr (WithTeacher) {
            T& t = teacher_max.value[lane];
            t = teacher[c] > t ? teacher[c] : t;
        }
    });
    return {student_max.max(), teacher_max.max()};
}

// Sums from pass 2, accumulated in double so that rows of hundreds of thousands of float classes keep
// their precision.
struct RowSums {
    double student_soft = 1.0;   // Z_s
    double teacher_soft = 1.0;   // Z_t
    double student_hard = 1.0;   // Z_h
    double teacher_cross = 0.0;  // sum_c exp(dt_c / T) (dt_c - ds_c)
    double target_mass = 0.0;    // sum_c y_c
    double target_cross = 0.0;   // sum_c y_c ds_c
};

// e^(ds) for the hard term. With an integer temperature T <= 4 it is (e^(ds/T))^T, two multiplies where
// an exponential would cost twenty operations; HardPower is that T, or 0 to evaluate the exponential.
template <int HardPower, class T>
inline T hard_exponential(T ds, T soft_exponential) noexcept {
    static_assert(HardPower >= 0 && HardPower <= 4);
    const T e = soft_exponential;
    if constexpr (HardPower == 0) return fast_exp(ds);
    if constexpr (HardPower == 1) return e;
    if constexpr (HardPower == 2) return e * e;
    if constexpr (HardPower == 3) return e * e * e;
    if constexpr (HardPower == 4) return (e * e) * (e * e);
}

template <class T, class Terms, int HardPower>
RowSums exponentials(const T* student, const T* teacher, const T* target, RowMaxima<T> maxima, T inverse_temperature,
                     T* student_soft, T* teacher_soft, T* student_hard, std::size_t n) noexcept {
    Lanes<double> z_student(0.0), z_teacher(0.0), z_hard(0.0), teacher_cross(0.0), target_mass(0.0),
        target_cross(0.0);
    Lanes<T> p_student(0), p_teacher(0), p_hard(0), p_teacher_cross(0), p_target_mass(0), p_target_cross(0);
    auto flush = [&]() {
        for (std::size_t lane = 0; lane < row_lanes; ++lane) {
            z_student.value[lane] += p_student.value[lane];
            z_teacher.value[lane] += p_teacher.value[lane];
            z_hard.value[lane] += p_hard.value[lane];
            teacher_cross.value[lane] += p_teacher_cross.value[lane];
            target_mass.value[lane] += p_target_mass.value[lane];
            target_cross.value[lane] += p_target_cross.value[lane];
            p_student.value[lane] = p_teacher.value[lane] = p_hard.value[lane] = T(0);
            p_teacher_cross.value[lane] = p_target_mass.value[lane] = p_target_cross.value[lane] = T(0);
        }
    };
    auto body = [&](std::size_t c, std::size_t lane) {
        const T ds = student[c] - maxima.student;
        T e_student = T(0);
        if constexpr (Terms::soft) {
            const T dt = teacher[c] - maxima.teacher;
            e_student = fast_exp(ds * inverse_temperature);
            const T e_teacher = fast_exp(dt * inverse_temperature);
            p_student.value[lane] += e_student;
            p_teacher.value[lane] += e_teacher;
            p_teacher_cross.value[lane] += e_teacher == T(0) ? T(0) : e_teacher * (dt - ds);
            if constexpr (Terms::gradient) {
                student_soft[c] = e_student;
                teacher_soft[c] = e_teacher;
            }
        }
        if constexpr (Terms::hard) {
            const T e_hard = hard_exponential<HardPower>(ds, e_student);
            p_hard.value[lane] += e_hard;
            if constexpr (Terms::gradient) student_hard[c] = e_hard;
        }
        if constexpr (Terms::distribution) {
            p_target_mass.value[lane] += target[c];
            p_target_cross.value[lane] += target[c] == T(0) ? T(0) : target[c] * ds;
        }
    };
    // Double partial sums need no widening; float ones are flushed into double before they lose precision.
    if constexpr (std::is_same_v<T, double>) {
        for_each_lane(n, body);
        flush();
    } else {
        for_each_lane_flushing<16>(n, body, flush);
    }
    RowSums sums;
    if constexpr (Terms::soft) {
        sums.student_soft = z_student.sum();
        sums.teacher_soft = z_teacher.sum();
        sums.teacher_cross = teacher_cross.sum();
    }
    if constexpr (Terms::hard) sums.student_hard = z_hard.sum();
    if constexpr (Terms::distribution) {
        sums.target_mass = target_mass.sum();
        sums.target_cross = target_cross.sum();
    }
    return sums;
}

// gradient_c = soft_q q_c - soft_p p_c + hard_h h_c - hard_y y_c, the coefficients folding in the
// normalising sums, the weights and the reduction's scale.
template <class T, class Terms>
void write_gradient(T* gradient, const T* student_soft, const T* teacher_soft, const T* student_hard, const T* target,
                    T soft_q, T soft_p, T hard_h, T hard_y, std::size_t n) noexcept {
    for (std::size_t c = 0; c < n; ++c) {
        T g = T(0);
        if constexpr (Terms::soft) g += soft_q * student_soft[c] - soft_p * teacher_soft[c];
        if constexpr (Terms::hard) g += hard_h * student_hard[c];
        if constexpr (Terms::distribution) g -= hard_y * target[c];
        gradient[c] = g;
    }
}

// Returns the row's loss and, when Terms::gradient, writes its gradient.
template <class T, class Terms, int HardPower>
double distill_row(const BatchProblem<T>& problem, const T* student, const T* teacher, std::int64_t class_index,
                   const T* target, T* scratch, T* gradient) noexcept {
    const std::size_t n = problem.classes;
    const double temperature = problem.temperature;
    T* student_soft = scratch;
    T* teacher_soft = scratch + n;
    T* student_hard = scratch + 2 * n;

    const RowMaxima<T> maxima = row_maxima<T, Terms::soft>(student, teacher, n);
    const RowSums sums = exponentials<T, Terms, HardPower>(student, teacher, target, maxima, static_cast<T>(1.0 / temperature),
                                                student_soft, teacher_soft, student_hard, n);

    double loss = 0.0;
    if constexpr (Terms::soft) {
        const double kl = sums.teacher_cross / (sums.teacher_soft * temperature) - std::log(sums.teacher_soft) +
                          std::log(sums.student_soft);
        loss += problem.soft_weight * temperature * temperature * kl;
    }
    double target_mass = 1.0;
    if constexpr (Terms::hard) {
        const double log_z = std::log(sums.student_hard);
        double hard;
        if constexpr (Terms::distribution) {
            target_mass = sums.target_mass;
            hard = target_mass * log_z - sums.target_cross;
        } else {
            hard = log_z - (static_cast<double>(student[class_index]) - static_cast<double>(maxima.student));
        }
        loss += problem.hard_weight * hard;
    }

    if constexpr (Terms::gradient) {
        const double scale = problem.gradient_scale;
        const double soft = scale * problem.soft_weight * temperature;
        const double hard = scale * problem.hard_weight;
        write_gradient<T, Terms>(gradient, student_soft, teacher_soft, student_hard, target,
                                 static_cast<T>(soft / sums.student_soft), static_cast<T>(soft / sums.teacher_soft),
                                 static_cast<T>(hard * target_mass / sums.student_hard), static_cast<T>(hard), n);
        if constexpr (Terms::hard && !Terms::distribution) gradient[class_index] -= static_cast<T>(hard);
    }
    return loss;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
