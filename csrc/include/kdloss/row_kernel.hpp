#pragma once

// The distillation loss and its gradient for one row of logits: the one place where the math lives.
//
// For student logits s, teacher logits t, temperature T, with q_T = softmax(s/T), p_T = softmax(t/T) and
// p_1 = softmax(s):
//   soft = T^2 * sum_c p_T,c * (log p_T,c - log q_T,c)           d soft / d s = T * (q_T - p_T)
//   hard = -sum_c y_c * log p_1,c                                 d hard / d s = p_1 * sum(y) - y
// Every log-probability is formed as (x - max) / T - log(sum exp((x - max) / T)), so no logarithm of a
// probability is ever taken and no epsilon is needed: exact zeros (from -inf logits or underflow) stay
// exact, and are masked where the math says 0 * log 0 = 0.
//
// Each loop below runs over one contiguous row with no branch and no opaque call in its body, so that
// the compiler can vectorise it; the choices between label kinds are made once per row, outside them.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace kdloss::detail {

// What the hard term compares one row with.
template <class T>
struct RowTarget {
    enum class Kind { none, class_index, distribution };
    Kind kind = Kind::none;
    std::int64_t class_index = 0;
    const T* distribution = nullptr;
};

// Per-call constants, already resolved from (temperature, alpha, reduction, labels present).
struct RowWeights {
    double temperature = 1.0;
    double inverse_temperature = 1.0;
    double soft_weight = 1.0;      // (1 - alpha) with labels, 1 without; 0 drops the soft term entirely
    double hard_weight = 0.0;      // alpha with labels, 0 without; 0 drops the hard term entirely
    double gradient_scale = 1.0;   // 1 / (counted rows) for "mean", 1 otherwise
};

// Three rows of per-class exponentials, reused across the rows of a call.
template <class T>
struct RowScratch {
    T* student_soft;   // exp((s - max s) / T)
    T* teacher_soft;   // exp((t - max t) / T)
    T* student_hard;   // exp(s - max s)
};

template <class T>
T row_max(const T* x, std::size_t n) noexcept {
    // Starts at -inf so that an all -inf row yields -inf (and then NaN, as softmax is undefined there).
    T m = -std::numeric_limits<T>::infinity();
    for (std::size_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
    return m;
}

// Writes exp((x - x_max) * scale) and returns its sum, accumulated in double so that rows of hundreds of
// thousands of float classes keep their precision.
template <class T>
double exp_and_sum(const T* x, T x_max, T scale, T* e, std::size_t n) noexcept {
    double sum = 0.0;
    for (std::size_t c = 0; c < n; ++c) {
        e[c] = std::exp((x[c] - x_max) * scale);
        sum += static_cast<double>(e[c]);
    }
    return sum;
}

// KL(p_T || q_T) / T^2-free form: sum_c p_c * (log p_c - log q_c), with
// log p_c - log q_c = (t_c - s_c) / T - shift and shift = (max t - max s) / T + log Z_t - log Z_s.
// Evaluated in double: t_c - s_c and the shift can both be large while their difference is small.
template <class T>
double kl_sum(const T* student, const T* teacher, const T* teacher_exp, double teacher_inv_sum,
              double inverse_temperature, double shift, std::size_t n) noexcept {
    double kl = 0.0;
    for (std::size_t c = 0; c < n; ++c) {
        const double p = static_cast<double>(teacher_exp[c]) * teacher_inv_sum;
        const double log_ratio =
            (static_cast<double>(teacher[c]) - static_cast<double>(student[c])) * inverse_temperature - shift;
        kl += p == 0.0 ? 0.0 : p * log_ratio;  // 0 * log 0 = 0, even against a student -inf
    }
    return kl;
}

// sum_c y_c * (s_c - max s), skipping y_c = 0 so that a -inf logit the target does not want costs nothing.
template <class T>
double weighted_centred_sum(const T* student, T student_max, const T* y, std::size_t n) noexcept {
    double sum = 0.0;
    for (std::size_t c = 0; c < n; ++c) {
        const double term =
            static_cast<double>(y[c]) * (static_cast<double>(student[c]) - static_cast<double>(student_max));
        sum += y[c] == T(0) ? 0.0 : term;
    }
    return sum;
}

template <class T>
double row_sum(const T* x, std::size_t n) noexcept {
    double sum = 0.0;
    for (std::size_t c = 0; c < n; ++c) sum += static_cast<double>(x[c]);
    return sum;
}

// gradient_c = soft_q * q_c - soft_p * p_c + hard_p * e1_c - hard_y * y_c, each part present or not at
// compile time so that every variant is one branch-free loop.
template <class T, bool Soft, bool Hard, bool Distribution>
void write_gradient(T* gradient, const RowScratch<T>& scratch, const T* y, T soft_q, T soft_p, T hard_p,
                    T hard_y, std::size_t n) noexcept {
    for (std::size_t c = 0; c < n; ++c) {
        T g = T(0);
        if constexpr (Soft) g += soft_q * scratch.student_soft[c] - soft_p * scratch.teacher_soft[c];
        if constexpr (Hard) g += hard_p * scratch.student_hard[c];
        if constexpr (Distribution) g -= hard_y * y[c];
        gradient[c] = g;
    }
}

// Returns the row's loss; writes its gradient (already multiplied by weights.gradient_scale) when
// `gradient` is not null.
template <class T>
double distill_row(const T* student, const T* teacher, std::size_t classes, const RowTarget<T>& target,
                   const RowWeights& weights, const RowScratch<T>& scratch, T* gradient) noexcept {
    using Kind = typename RowTarget<T>::Kind;
    const bool soft = weights.soft_weight != 0.0;
    const bool hard = weights.hard_weight != 0.0 && target.kind != Kind::none;
    const T student_max = row_max(student, classes);

    double loss = 0.0;
    double student_soft_sum = 1.0, teacher_soft_sum = 1.0;
    if (soft) {
        const T teacher_max = row_max(teacher, classes);
        const T inverse_temperature = static_cast<T>(weights.inverse_temperature);
        student_soft_sum = exp_and_sum(student, student_max, inverse_temperature, scratch.student_soft, classes);
        teacher_soft_sum = exp_and_sum(teacher, teacher_max, inverse_temperature, scratch.teacher_soft, classes);
        const double shift =
            (static_cast<double>(teacher_max) - static_cast<double>(student_max)) * weights.inverse_temperature +
            std::log(teacher_soft_sum) - std::log(student_soft_sum);
        const double kl = kl_sum(student, teacher, scratch.teacher_soft, 1.0 / teacher_soft_sum,
                                 weights.inverse_temperature, shift, classes);
        loss += weights.soft_weight * weights.temperature * weights.temperature * kl;
    }

    double student_hard_sum = 1.0, target_mass = 0.0;
    if (hard) {
        student_hard_sum = exp_and_sum(student, student_max, T(1), scratch.student_hard, classes);
        const double log_sum = std::log(student_hard_sum);
        double hard_loss;
        if (target.kind == Kind::class_index) {
            target_mass = 1.0;
            const auto k = static_cast<std::size_t>(target.class_index);
            hard_loss = log_sum - (static_cast<double>(student[k]) - static_cast<double>(student_max));
        } else {
            target_mass = row_sum(target.distribution, classes);
            hard_loss = target_mass * log_sum -
                        weighted_centred_sum(student, student_max, target.distribution, classes);
        }
        loss += weights.hard_weight * hard_loss;
    }

    if (gradient == nullptr) return loss;

    const double scale = weights.gradient_scale;
    const T soft_q = static_cast<T>(scale * weights.soft_weight * weights.temperature / student_soft_sum);
    const T soft_p = static_cast<T>(scale * weights.soft_weight * weights.temperature / teacher_soft_sum);
    const T hard_p = static_cast<T>(scale * weights.hard_weight * target_mass / student_hard_sum);
    const T hard_y = static_cast<T>(scale * weights.hard_weight);
    const T* y = target.distribution;
    const bool distribution = hard && target.kind == Kind::distribution;
    if (soft && hard && distribution)
        write_gradient<T, true, true, true>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);
    else if (soft && hard)
        write_gradient<T, true, true, false>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);
    else if (soft)
        write_gradient<T, true, false, false>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);
    else if (distribution)
        write_gradient<T, false, true, true>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);
    else if (hard)
        write_gradient<T, false, true, false>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);
    else
        write_gradient<T, false, false, false>(gradient, scratch, y, soft_q, soft_p, hard_p, hard_y, classes);

    if (hard && target.kind == Kind::class_index)
        gradient[static_cast<std::size_t>(target.class_index)] -= hard_y;
    return loss;
}

}  // namespace kdloss::detail
