#pragma once

// The exact pass for the two KLs (exact_row.hpp has why rows come here and the formulas), on Packs of doubles:
// the same formulas, with the kernels' exponential and logarithm (fast_exp2, fast_log1p) and fast_expm1, every
// branch computed for every lane and the right one selected. Near-match rows and every row above T = 100 come
// here, so in a call where the student has all but caught up with the teacher, every row does: scalar libm calls
// (ten an element) made such a call 85 times an ordinary one.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/exact_hard_term.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"
#include "kdloss/detail/top_entry.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// `lanes` logits of a row from class c on, as doubles; -inf past its end (no mass on either side).
template <class T>
KDLOSS_INLINE Pack<double> load_logits(const T* row, std::size_t c, std::size_t n) noexcept {
    double values[lanes];
    for (std::size_t i = 0; i < lanes; ++i)
        values[i] = c + i < n ? static_cast<double>(row[c + i]) : -std::numeric_limits<double>::infinity();
    return Pack<double>::load(values);
}

// phi(u) = (1 + u) log1p(u) - u (Forward) or psi(u) = u - log1p(u), u > -1: near 0 by their series,
//   phi(u) = u^2 sum_j (-u)^j / ((j + 1)(j + 2)),  psi(u) = u^2 sum_j (-u)^j / (j + 2),
// to |u|^21 (below 2^-53 of the first term for |u| < 1/8); elsewhere no more than a factor 20 cancels.
template <bool Forward>
KDLOSS_INLINE Pack<double> kl_term(const Pack<double>& u) noexcept {
    Pack<double> series(0.0);
    const Pack<double> minus_u = 0.0 - u;
    KDLOSS_UNROLL  // (a loop computed each coefficient with a division)
        for (int j = 19; j >= 0; --j) series =
            series * minus_u + (Forward ? 1.0 / ((j + 1.0) * (j + 2.0)) : 1.0 / (j + 2.0));
    const Pack<double> log1p_u = fast_log1p(u);
    const Pack<double> closed = Forward ? (1.0 + u) * log1p_u - u : u - log1p_u;
    const Pack<double> magnitude = from_bits(to_bits(u) & (~std::uint64_t{0} >> 1));
    return select(magnitude < Pack<double>(0.125), u * u * series, closed);
}

// A row as the exact pass takes it: its logits, their maxima and the student's top class (its first, if several).
template <class T>
struct ExactRow {
    const T* student;
    const T* teacher;
    double student_max, teacher_max;
    double shift;     // max t - max s
    std::size_t top;  // the student's top class
    double top_gap;   // t - s there
};

template <class T>
ExactRow<T> exact_row_logits(const BatchProblem<T>& problem, std::size_t row) noexcept {
    using V = Pack<double>;
    const std::size_t n = problem.classes;
    const auto r = static_cast<std::ptrdiff_t>(row);
    ExactRow<T> e{problem.student + r * problem.student_stride,
                  problem.teacher + r * problem.teacher_stride,
                  0.0,
                  0.0,
                  0.0,
                  0,
                  0.0};
    V student_lane_max(-std::numeric_limits<double>::infinity()), teacher_lane_max(student_lane_max);
    for (std::size_t c = 0; c < n; c += lanes) {
        const V s = load_logits(e.student, c, n), t = load_logits(e.teacher, c, n);
        student_lane_max = select(s > student_lane_max, s, student_lane_max);  // NaN is passed over, as by fmax
        teacher_lane_max = select(t > teacher_lane_max, t, teacher_lane_max);
    }
    e.student_max = student_lane_max.max();
    e.teacher_max = teacher_lane_max.max();
    e.shift = e.teacher_max - e.student_max;
    e.top = top_class(e.student, n, static_cast<T>(e.student_max));
    e.top_gap = static_cast<double>(e.teacher[e.top]) - static_cast<double>(e.student[e.top]);
    return e;
}

// L = log sum_c q_c e^(d_c) over q's support, from a row's chunks (`chunk(c)`: its ds, e^(ds/T), d and support from
// class c on, as exact_kl_row's Chunk), the row's Z_s and its largest d, and p's mass outside q's support P0
// (teacher_outside over Z_t): by log1p of sum_c q_c expm1(d_c), unless some d_c is too large for exp (a row that is
// no near match; then as a log-sum-exp). P0 makes the true L larger by -log(1 - P0).
template <class ChunkAt>
double log_ratio_sum(const ChunkAt& chunk, std::size_t n, double student_sum, double largest_d, double teacher_outside,
                     double teacher_sum, double temperature) noexcept {
    using V = Pack<double>;
    double log_ratio;
    if (largest_d < 600.0) {
        V sum(0.0);
        for (std::size_t c = 0; c < n; c += lanes) {
            const auto k = chunk(c);
            sum += select(k.student_support, k.e_student / student_sum * fast_expm1(k.d), 0.0);
        }
        log_ratio = std::log1p(sum.sum());
    } else {
        const double log_student_soft = std::log(student_sum);
        V lane_largest(-std::numeric_limits<double>::infinity());  // of log q_c + d_c
        for (std::size_t c = 0; c < n; c += lanes) {
            const auto k = chunk(c);
            const V v = k.ds / temperature - log_student_soft + k.d;
            lane_largest = select(k.student_support, select(v > lane_largest, v, lane_largest), lane_largest);
        }
        const double largest = lane_largest.max();
        V sum(0.0);
        for (std::size_t c = 0; c < n; c += lanes) {
            const auto k = chunk(c);
            const V v = k.ds / temperature - log_student_soft + k.d - largest;
            sum += select(k.student_support, fast_exp2(v, exp2_scale<double>(log2e)), 0.0);
        }
        log_ratio = largest + std::log(sum.sum());
    }
    if (teacher_outside != 0.0) log_ratio -= std::log1p(-teacher_outside / teacher_sum);
    return log_ratio;
}

// Row `row` of `problem` (a dense teacher, not ignored), its soft term forward KL (Forward) or reverse KL: writes
// its loss (or its two parts) and, if the problem has one, its gradient row, over what the kernels wrote.
template <bool Forward, class T>
void exact_kl_row(const BatchProblem<T>& problem, std::size_t row) noexcept {
    using V = Pack<double>;
    constexpr double minus_infinity = -std::numeric_limits<double>::infinity();
    const std::size_t n = problem.classes;
    const auto r = static_cast<std::ptrdiff_t>(row);
    const double temperature = problem.temperature;
    const Exp2Scale<double> soft = exp2_scale<double>(log2e / temperature), natural = exp2_scale<double>(log2e);
    const ExactRow<T> e = exact_row_logits(problem, row);
    const T* const student = e.student;
    const T* const teacher = e.teacher;
    const double student_max = e.student_max, teacher_max = e.teacher_max, shift = e.shift;
    const double top_d = (e.top_gap - shift) / temperature;

    // Per chunk: ds = s - max s, e^(ds/T), and d = ((t - s) - shift) / T, formed from t - s first (see exact_row.hpp).
    struct Chunk {
        V ds, e_student, d;
        Mask<double> student_support;  // s > -inf
    };
    auto chunk = [&](std::size_t c) KDLOSS_INLINE_LAMBDA {
        const V s = load_logits(student, c, n), t = load_logits(teacher, c, n);
        const V ds = s - student_max;
        return Chunk{ds, fast_exp2(ds, soft), ((t - s) - shift) / temperature, s > V(minus_infinity)};
    };

    const bool hard_term = problem.hard_weight != 0.0 && problem.label_kind != LabelKind::none;
    V student_soft(0.0), hard_maxima(0.0), hard_rest(0.0), teacher_soft(0.0), outside(0.0), outside_classes(0.0);
    V largest_d(minus_infinity), mean_lanes(0.0);
    for (std::size_t c = 0; c < n; c += lanes) {
        const Chunk k = chunk(c);
        const V t = load_logits(teacher, c, n);
        const V e_teacher = fast_exp2(t - teacher_max, soft);
        student_soft += k.e_student;
        if (hard_term) {
            const Mask<double> at_max = k.ds == V(0.0);
            hard_rest += select(at_max, 0.0, fast_exp2(k.ds, natural));
            hard_maxima += select(at_max, 1.0, 0.0);
        }
        teacher_soft += e_teacher;
        // p's mass outside q's support, P0, and whether there is any (however small its exponential).
        outside += select(k.student_support, 0.0, e_teacher);
        outside_classes += select(k.student_support | (t == V(minus_infinity)), 0.0, 1.0);
        largest_d = select(k.student_support, select(k.d > largest_d, k.d, largest_d), largest_d);
        // Reverse KL's Z_s sum_j q_j (d_j - d_top), which leaves L out.
        if (!Forward) mean_lanes += select(k.student_support, k.e_student * (k.d - top_d), 0.0);
    }
    const double student_sum = student_soft.sum(), teacher_sum = teacher_soft.sum();

    const double teacher_mass_outside = outside.sum();
    const double log_ratio =
        log_ratio_sum(chunk, n, student_sum, largest_d.max(), teacher_mass_outside, teacher_sum, temperature);
    const double mean = mean_lanes.sum() / student_sum;

    ExactHardTerm<T> labels = exact_hard_term(problem, r, student, student_max);
    labels.set_sums(hard_maxima.sum(), hard_rest.sum());
    const double hard = hard_term ? labels.loss() : 0.0;

    // The divergence and the gradient row in one pass, per class over q's support from q, x = d - L = log(p / q),
    // e^x and u = expm1(x): the terms q phi(u) or q psi(u), or where |x| > 1, in the log domain with p = q e^x;
    // the gradient -T q u (forward; T (q - p) in the log domain) or -T q ((d - d_top) - mean) (reverse).
    T* gradient = problem.gradient != nullptr ? problem.gradient + r * problem.gradient_stride : nullptr;
    const double soft_scale = problem.gradient_scale * problem.soft_weight * temperature;
    const double hard_scale = problem.gradient_scale * problem.hard_weight;
    V divergence_lanes(0.0);
    for (std::size_t c = 0; c < n; c += lanes) {
        const Chunk k = chunk(c);
        const V q = k.e_student / student_sum, x = k.d - log_ratio;
        const V exp_x = fast_exp2(x, natural), u = fast_expm1(x, exp_x), p = q * exp_x;
        const Mask<double> far = from_bits(to_bits(x) & (~std::uint64_t{0} >> 1)) > V(1.0);  // |x| > 1
        // (Forward, p = 0: q, not 0 (-inf) - (0 - q), where the teacher's logit is -inf.)
        const V far_term = Forward ? select(p == V(0.0), q, p * x - (p - q)) : (p - q) - q * x;
        divergence_lanes += select(k.student_support, select(far, far_term, q * kl_term<Forward>(u)), 0.0);
        if (gradient == nullptr) continue;
        V g = Forward ? select(far, soft_scale * (q - p), (0.0 - soft_scale) * q * u)
                      : (0.0 - soft_scale) * q * ((k.d - top_d) - mean);
        if (hard_term) g += labels.gradient(fast_exp2(k.ds, natural), k.ds, hard_scale);
        g = select(k.student_support, g, 0.0);
        double values[lanes];
        g.store(values);
        for (std::size_t i = 0; i < lanes && c + i < n; ++i)
            gradient[c + i] = static_cast<T>(hard_term ? labels.less_target(values[i], c + i, hard_scale) : values[i]);
    }
    double divergence = divergence_lanes.sum();
    // Forward KL is infinite where the teacher has mass outside q's support. Over q's support, sum_c q_c u_c = -P0,
    // not 0: reverse KL's sum of q psi(u) leaves it out.
    if (Forward && outside_classes.sum() != 0.0) divergence = std::numeric_limits<double>::infinity();
    if (!Forward) divergence += teacher_mass_outside / teacher_sum;
    const double soft_loss = temperature * temperature * divergence;
    if (problem.row_hard_losses != nullptr) {
        problem.row_losses[row] = soft_loss;
        problem.row_hard_losses[row] = hard;
    } else {
        problem.row_losses[row] = problem.soft_weight * soft_loss + (hard_term ? problem.hard_weight * hard : 0.0);
    }
    // Reverse KL infinite (the teacher rules out a class the student keeps): no derivative, NaN over q's support.
    if (!Forward && gradient != nullptr && std::isinf(divergence))
        for (std::size_t c = 0; c < n; ++c)
            if (student[c] != -std::numeric_limits<T>::infinity()) gradient[c] = std::numeric_limits<T>::quiet_NaN();
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
