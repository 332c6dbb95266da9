#pragma once

// The distillation loss and its gradient, written once over "lanes" so that two drivers can share it
// (row_kernel.hpp): a long row is spread over the lanes (lane = class % lanes) and the lanes' partial sums are
// added at the end; a block of short rows is transposed so that each lane is one row, and no lane ever
// meets another.
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
// Loops run over contiguous data with the lane index innermost, no branch and no call the compiler cannot
// inline, so they vectorise without the compiler having to reassociate a floating-point sum; which terms
// exist is fixed at compile time (Terms).

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/simd_math.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define KDLOSS_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define KDLOSS_NOINLINE __declspec(noinline)
#else
#define KDLOSS_NOINLINE
#endif

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <bool Soft, bool Hard, bool Distribution, bool Gradient>
struct Terms {
    static constexpr bool soft = Soft;
    static constexpr bool hard = Hard;
    static constexpr bool distribution = Distribution;  // hard term against a target distribution
    static constexpr bool gradient = Gradient;
    using without_gradient = Terms<Soft, Hard, Distribution, false>;
};

template <class T>
struct alignas(64) Lanes {
    T value[lanes];

    explicit Lanes(T initial = T(0)) noexcept {
        for (std::size_t lane = 0; lane < lanes; ++lane) value[lane] = initial;
    }
    T& operator[](std::size_t lane) noexcept { return value[lane]; }
    const T& operator[](std::size_t lane) const noexcept { return value[lane]; }
    // Lanes are combined pairwise in a fixed order: results never depend on the vector width in use, and a
    // tree is four additions deep where a chain would be sixteen.
    T sum() const noexcept {
        T total = T(0);
        for (std::size_t lane = 0; lane < lanes; ++lane) total += value[lane];
        return total;
    }
    T max() const noexcept {
        T result = value[0];
        for (std::size_t lane = 1; lane < lanes; ++lane) result = value[lane] > result ? value[lane] : result;
        return result;
    }
};

// body(i, lane) for i = 0 .. n-1 with lane = i % lanes, a block of lanes at a time.
template <class Body>
inline void for_each_lane(std::size_t n, Body&& body) noexcept {
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes)
        for (std::size_t lane = 0; lane < lanes; ++lane) body(i + lane, lane);
    for (std::size_t lane = 0; i + lane < n; ++lane) body(i + lane, lane);
}

// for_each_lane, calling flush() after every BlocksPerFlush blocks and at the end: float partial sums of a
// few hundred terms are exact to a few ulps, and flushing them into double totals keeps rows of any length
// accurate at a fraction of the cost of widening every element.
template <std::size_t BlocksPerFlush, class Body, class Flush>
inline void for_each_lane_flushing(std::size_t n, Body&& body, Flush&& flush) noexcept {
    std::size_t i = 0;
    std::size_t blocks = 0;
    for (; i + lanes <= n; i += lanes) {
        for (std::size_t lane = 0; lane < lanes; ++lane) body(i + lane, lane);
        if (++blocks == BlocksPerFlush) {
            flush();
            blocks = 0;
        }
    }
    for (std::size_t lane = 0; i + lane < n; ++lane) body(i + lane, lane);
    flush();
}

// Per-lane maxima. They start at -inf, so an all -inf row yields -inf and then NaN: it has no softmax.
template <class T>
struct LaneMaxima {
    Lanes<T> student, teacher;
};

template <class T, bool WithTeacher>
LaneMaxima<T> lane_maxima(const T* student, const T* teacher, std::size_t n) noexcept {
    Lanes<T> student_max(-std::numeric_limits<T>::infinity());
    Lanes<T> teacher_max(-std::numeric_limits<T>::infinity());
    for_each_lane(n, [&](std::size_t i, std::size_t lane) {
        student_max[lane] = select(student[i] > student_max[lane], student[i], student_max[lane]);
        if constexpr (WithTeacher)
            teacher_max[lane] = select(teacher[i] > teacher_max[lane], teacher[i], teacher_max[lane]);
    });
    return {student_max, teacher_max};
}

// Per-lane sums of the exponential pass, in double.
struct LaneSums {
    Lanes<double> student_soft;   // Z_s
    Lanes<double> teacher_soft;   // Z_t
    Lanes<double> student_hard;   // Z_h
    Lanes<double> teacher_cross;  // sum_c exp(dt_c / T) (dt_c - ds_c)
    Lanes<double> target_mass;    // sum_c y_c
    Lanes<double> target_cross;   // sum_c y_c ds_c
};

// e^(ds) for the hard term. With an integer temperature T <= 4 it is (e^(ds/T))^T, a multiply or two where
// an exponential costs twenty operations; HardPower is that T, or 0 to evaluate the exponential.
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

// Writes the exponentials to scratch and adds their per-lane sums to `sums`. Loss-only and loss-and-gradient calls
// run this very function (callers pass Terms::without_gradient, and it is never inlined into them), so
// both return bitwise the same loss.
template <class T, class Terms, int HardPower>
KDLOSS_NOINLINE void exponentials(const T* student, const T* teacher, const T* target, const Lanes<T>& student_maxima,
                                  const Lanes<T>& teacher_maxima, T inverse_temperature, T* student_soft,
                                  T* teacher_soft, T* student_hard, std::size_t n, LaneSums& sums) noexcept {
    // Local copies cannot alias the scratch being written, which spares the loop a run-time alias check.
    const Lanes<T> student_max = student_maxima, teacher_max = teacher_maxima;
    // The normalising sums are accumulated in double element by element: each is 1 (the maximum's term) plus
    // the rest, and a float partial sum would round that rest to float's resolution at 1, which is all of a
    // confident row's cross-entropy. The other sums have no such offset and use float partials.
    Lanes<double> z_student, z_teacher, z_hard;
    Lanes<T> teacher_cross, target_mass, target_cross;
    auto flush = [&]() {
        for (std::size_t lane = 0; lane < lanes; ++lane) {
            sums.teacher_cross[lane] += teacher_cross[lane];
            sums.target_mass[lane] += target_mass[lane];
            sums.target_cross[lane] += target_cross[lane];
            teacher_cross[lane] = target_mass[lane] = target_cross[lane] = T(0);
        }
    };
    auto body = [&](std::size_t i, std::size_t lane) {
        const T ds = student[i] - student_max[lane];
        T e_student = T(0);
        if constexpr (Terms::soft) {
            const T dt = teacher[i] - teacher_max[lane];
            e_student = fast_exp(ds * inverse_temperature);
            const T e_teacher = fast_exp(dt * inverse_temperature);
            z_student[lane] += e_student;
            z_teacher[lane] += e_teacher;
            // A teacher probability of exactly 0 contributes 0, whatever the student says there.
            teacher_cross[lane] += select(e_teacher == T(0), T(0), e_teacher * (dt - ds));
            student_soft[i] = e_student;
            teacher_soft[i] = e_teacher;
        }
        if constexpr (Terms::hard) {
            const T e_hard = hard_exponential<HardPower>(ds, e_student);
            z_hard[lane] += e_hard;
            // A power of the soft exponential is cheaper to recompute in the gradient pass than to store.
            if constexpr (HardPower == 0) student_hard[i] = e_hard;
        }
        if constexpr (Terms::distribution) {
            target_mass[lane] += target[i];
            // A class the target does not want costs nothing, even at a student -inf.
            target_cross[lane] += select(target[i] == T(0), T(0), target[i] * ds);
        }
    };
    if constexpr (std::is_same_v<T, double>) {
        for_each_lane(n, body);  // already double: nothing to widen
        flush();
    } else {
        for_each_lane_flushing<16>(n, body, flush);
    }
    for (std::size_t lane = 0; lane < lanes; ++lane) {
        sums.student_soft[lane] += z_student[lane];
        sums.teacher_soft[lane] += z_teacher[lane];
        sums.student_hard[lane] += z_hard[lane];
    }
}

// A row's loss from its sums. `target_logit` is ds at the label for class-index labels. fast_log, not
// std::log: it costs a few cycles, which matters for short rows, and it vectorises across a block's lanes.
template <class Terms>
inline double loss_from_sums(double student_soft, double teacher_soft, double student_hard, double teacher_cross,
                             double target_mass, double target_cross, double target_logit, double temperature,
                             double soft_weight, double hard_weight) noexcept {
    double loss = 0.0;
    if constexpr (Terms::soft) {
        const double kl =
            teacher_cross / (teacher_soft * temperature) - fast_log(teacher_soft) + fast_log(student_soft);
        loss += soft_weight * temperature * temperature * kl;
    }
    if constexpr (Terms::hard) {
        const double hard = Terms::distribution ? target_mass * fast_log(student_hard) - target_cross
                                                : fast_log(student_hard) - target_logit;
        loss += hard_weight * hard;
    }
    return loss;
}

// Gradient coefficients of one lane: gradient = soft_q q - soft_p p + hard_h h - hard_y y, folding in the
// normalising sums, the weights and the reduction's scale.
template <class T>
struct GradientCoefficients {
    Lanes<T> soft_q, soft_p, hard_h, hard_y;

    void set(std::size_t lane, double student_soft, double teacher_soft, double student_hard, double target_mass,
             double soft_scale, double hard_scale) noexcept {
        soft_q[lane] = static_cast<T>(soft_scale / student_soft);
        soft_p[lane] = static_cast<T>(soft_scale / teacher_soft);
        hard_h[lane] = static_cast<T>(hard_scale * target_mass / student_hard);
        hard_y[lane] = static_cast<T>(hard_scale);
    }
};

template <class T, class Terms, int HardPower>
void write_gradient(T* gradient, const T* student_soft, const T* teacher_soft, const T* student_hard, const T* target,
                    const GradientCoefficients<T>& coefficients, std::size_t n) noexcept {
    const GradientCoefficients<T> k = coefficients;  // a local copy, as in exponentials()
    for_each_lane(n, [&](std::size_t i, std::size_t lane) {
        T g = T(0);
        if constexpr (Terms::soft) g += k.soft_q[lane] * student_soft[i] - k.soft_p[lane] * teacher_soft[i];
        if constexpr (Terms::hard && HardPower == 0) g += k.hard_h[lane] * student_hard[i];
        if constexpr (Terms::hard && HardPower != 0)
            g += k.hard_h[lane] * hard_exponential<HardPower>(T(0), student_soft[i]);
        if constexpr (Terms::distribution) g -= k.hard_y[lane] * target[i];
        gradient[i] = g;
    });
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
