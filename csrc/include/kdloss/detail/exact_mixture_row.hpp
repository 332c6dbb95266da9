#pragma once

// The exact pass for the mixture divergences (exact_row.hpp has why rows come here; the formulas are below), on Packs
// of doubles as exact_kl_row.hpp's for the KLs: every branch computed for every lane and the right one selected, with
// the kernels' exponential and logarithm (fast_exp2, fast_log1p) and fast_expm1. In scalar double through libm a
// row cost 125-140 ns an element, so that a float64 call whose every row came here (near matches) took 20-24 times an
// ordinary one, now 6-7 (256x1000, 16x32000); a float32 call above T = 100, 60-75 times, now 15-22.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/exact_hard_term.hpp"
#include "kdloss/detail/exact_kl_row.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"
#include "kdloss/divergence.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// log(e^a + e^b), either may be -inf (not both), or b +inf.
KDLOSS_INLINE Pack<double> log_add_exp(const Pack<double>& a, const Pack<double>& b) noexcept {
    const Pack<double> larger = select(a > b, a, b), smaller = select(a > b, b, a);
    return larger + fast_log1p(fast_exp2(smaller - larger, exp2_scale<double>(log2e)));
}

// A mixture divergence's term of a class and its G = dD/dq (up to a constant; the gradient is T q (G - E_q[G]),
// mixture.hpp), given p, q and x = log(p / q). With m = a p + b q = q (1 + a u), u = p / q - 1 = expm1(x):
//   jsd (a = beta):           beta p log(p / m) + (1 - beta) q log(q / m),  G = (1 - beta) log(q / m)
//   skew_forward_kl (a = l):  p log(p / m) - (1 - l)(p - q),              G = (1 - l)(1 - p / m)
//   skew_reverse_kl (a = 1-l): q log(q / m) + a (p - q),                  G = log(q / m) + l (1 - q / m)
// each term shifted by a multiple of p - q (which sums to 0 over the classes) and G by a constant, so that
// both vanish with u, and then: log(q / m) = -log(a e^x + b) as a log-sum-exp of log a + x and log b (log1p of
// tiny numbers where a e^x is small: exact however small a is), and log(p / m) = -log(a + b e^-x) alike. Where |u| <
// 1/8 the terms, O(u^2), come from their series instead, without cancellation: sum_k c_k u^k with
//   jsd:             c_k = (-1)^k beta (1 - beta^(k-1)) / (k (k - 1)),
//   skew_forward_kl: c_k = (-1)^(k+1) ((1 - l^k) / k - (1 - l^(k-1)) / (k - 1)),
//   skew_reverse_kl: q psi(a u) (reverse_term),
// 1 - w^k taken as -expm1(k log w), exact for a weight w near 1; and G from u: -(1 - beta) log1p(beta u),
// -(1 - l)^2 u / (1 + l u) and -log1p(a u) + l a u / (1 + a u), exact relative to themselves, where the
// log-sum-exps would leave them an error of an ulp of log 2. Elsewhere no more than a factor of about 16
// cancels (1 / (1 - l) more for the skew forward term, whose skew is below 1).
struct MixtureClasses {
    Pack<double> term, g;
};

// The formulas for one problem: its weights, their logarithms and the series' coefficients, worked out once (each
// coefficient costs an expm1), then `at` and `less_top` per block of classes.
class MixtureTerms {
public:
    MixtureTerms(Divergence kind, double beta, double skew) noexcept : kind_(kind), beta_(beta), skew_(skew) {
        a_ = kind == Divergence::jsd ? beta : kind == Divergence::skew_forward_kl ? skew : 1.0 - skew;
        log_a_ = kind == Divergence::skew_reverse_kl ? std::log1p(-skew) : std::log(a_);
        log_b_ = kind == Divergence::skew_reverse_kl ? std::log(skew) : std::log1p(-a_);
        const double weight = kind == Divergence::jsd ? beta : skew, log_weight = std::log(weight);
        auto one_minus_power = [&](int k) { return k == 0 ? 0.0 : -std::expm1(k * log_weight); };  // 1 - w^k
        for (int k = 2; k < terms; ++k) {
            const double sign = k % 2 == 0 ? 1.0 : -1.0;
            coefficient_[k] = kind == Divergence::jsd
                                  ? sign * weight * one_minus_power(k - 1) / (k * (k - 1.0))
                                  : -sign * (one_minus_power(k) / k - one_minus_power(k - 1) / (k - 1.0));
        }
    }

    // Class terms given q, p, x = log(p / q) and u = expm1(x); where q = 0 (the student has no mass there, p > 0),
    // m = a p, and G unused. The series' forms first, and the others only where a lane needs them: near-match rows,
    // which most rows here are, have none that do.
    KDLOSS_INLINE MixtureClasses at(const Pack<double>& q, const Pack<double>& p, const Pack<double>& x,
                                    const Pack<double>& u) const noexcept {
        using V = Pack<double>;
        const Mask<double> near = magnitude(u) < V(0.125);
        const Mask<double> no_student = q == V(0.0);
        V near_term, near_g;
        if (kind_ == Divergence::jsd) {
            near_term = q * series(u);
            near_g = (0.0 - (1.0 - beta_)) * fast_log1p(beta_ * u);
        } else if (kind_ == Divergence::skew_forward_kl) {
            near_term = q * series(u);
            near_g = (-(1.0 - skew_) * (1.0 - skew_)) * u / (1.0 + skew_ * u);
        } else {
            const V au = a_ * u;
            near_term = q * reverse_term(au);
            near_g = skew_ * au / (1.0 + au) - fast_log1p(au);
        }
        const double elsewhere = select(near, V(0.0), V(1.0)).sum() + select(no_student, V(1.0), V(0.0)).sum();
        if (elsewhere == 0.0) return {near_term, near_g};

        const Mask<double> with_teacher = p > V(0.0);
        const V log_q_over_m = V(0.0) - log_add_exp(log_a_ + x, V(log_b_));
        const V log_p_over_m = V(0.0) - log_add_exp(V(log_a_), log_b_ - x);  // not x + log(q / m), which may cancel
        V term, g, no_student_term;
        if (kind_ == Divergence::jsd) {
            term = select(with_teacher, beta_ * p * log_p_over_m, 0.0) + (1.0 - beta_) * q * log_q_over_m;
            g = (1.0 - beta_) * log_q_over_m;
            no_student_term = (-beta_ * log_a_) * p;
        } else if (kind_ == Divergence::skew_forward_kl) {
            term = select(with_teacher, p * log_p_over_m, 0.0) - (1.0 - skew_) * (p - q);
            g = (1.0 - skew_) * (1.0 - fast_exp2(log_p_over_m, exp2_scale<double>(log2e)));
            no_student_term = (-log_a_ - (1.0 - skew_)) * p;
        } else {
            term = q * log_q_over_m + a_ * (p - q);
            g = log_q_over_m + skew_ * (1.0 - fast_exp2(log_q_over_m, exp2_scale<double>(log2e)));
            no_student_term = a_ * p;
        }
        return {select(no_student, no_student_term, select(near, near_term, term)), select(near, near_g, g)};
    }

    // G at a class less G at the student's top class, given u at both and du = u - u_top (more exact than u less
    // u_top): from G's definitions, with v = a u and w = a du / (1 + v_top),
    //   jsd: -(1 - beta) log1p(w),  skew_forward_kl: -(1 - l)^2 du / ((1 + l u)(1 + l u_top)),
    //   skew_reverse_kl: -log1p(w) + l w / (1 + v), or psi(w) - w (1 - l + v) / (1 + v) where |w| < 1/2,
    // each exact relative to itself but for the last's sum, which cancels only where G is flat (where the teacher
    // has next to no mass, v near l - 1). (Its second form for a large w would cancel: psi(w) ~ w there.)
    KDLOSS_INLINE Pack<double> less_top(const Pack<double>& u, double u_top, const Pack<double>& du) const noexcept {
        using V = Pack<double>;
        if (kind_ == Divergence::skew_forward_kl)
            return (-(1.0 - skew_) * (1.0 - skew_)) * (du / (1.0 + skew_ * u)) / (1.0 + skew_ * u_top);
        const V w = (a_ / (1.0 + a_ * u_top)) * du;
        if (kind_ == Divergence::jsd) return (0.0 - (1.0 - beta_)) * fast_log1p(w);
        const V v = a_ * u;
        const V small = reverse_term(w) - w * ((1.0 - skew_) + v) / (1.0 + v);
        return select(magnitude(w) < V(0.5), small, skew_ * w / (1.0 + v) - fast_log1p(w));
    }

private:
    static constexpr int terms = 22;  // c_2 .. c_21

    // sum_k c_k u^k
    KDLOSS_INLINE Pack<double> series(const Pack<double>& u) const noexcept {
        Pack<double> sum(0.0);
        KDLOSS_UNROLL
        for (int k = terms - 1; k >= 2; --k) sum = sum * u + coefficient_[k];
        return u * u * sum;
    }

    // psi(u) = u - log1p(u), u > -1: exact_kl_row.hpp's reverse KL term.
    static KDLOSS_INLINE Pack<double> reverse_term(const Pack<double>& u) noexcept { return kl_term<false>(u); }

    Divergence kind_;
    double beta_, skew_, a_ = 0.0, log_a_ = 0.0, log_b_ = 0.0;
    double coefficient_[terms] = {};
};

// Row `row` of `problem` (a dense teacher, not ignored), its soft term the mixture problem.divergence: writes its
// loss (or its two parts) and, if the problem has one, its gradient row, over what the kernels wrote.
template <class T>
void exact_mixture_row(const BatchProblem<T>& problem, std::size_t row) noexcept {
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
    const std::size_t top = e.top;
    const double top_gap = e.top_gap;

    // Per chunk: ds = s - max s, e^(ds/T), e^(dt/T), d = ((t - s) - shift) / T, formed from t - s first, and
    // d - d_top from t - s and t_top - s_top, in which the shift cancels.
    struct Chunk {
        V ds, e_student, e_teacher, d, apart;
        Mask<double> student_support, teacher_support;  // s > -inf, t > -inf
    };
    auto chunk = [&](std::size_t c) KDLOSS_INLINE_LAMBDA {
        const V s = load_logits(student, c, n), t = load_logits(teacher, c, n);
        const V ds = s - student_max;
        return Chunk{ds,
                     fast_exp2(ds, soft),
                     fast_exp2(t - teacher_max, soft),
                     ((t - s) - shift) / temperature,
                     ((t - s) - top_gap) / temperature,
                     s > V(minus_infinity),
                     t > V(minus_infinity)};
    };

    const bool hard_term = problem.hard_weight != 0.0 && problem.label_kind != LabelKind::none;
    V student_soft(0.0), hard_maxima(0.0), hard_rest(0.0), teacher_soft(0.0), outside(0.0);
    V largest_d(minus_infinity);
    for (std::size_t c = 0; c < n; c += lanes) {
        const Chunk k = chunk(c);
        student_soft += k.e_student;
        if (hard_term) {
            const Mask<double> at_max = k.ds == V(0.0);
            hard_rest += select(at_max, 0.0, fast_exp2(k.ds, natural));
            hard_maxima += select(at_max, 1.0, 0.0);
        }
        teacher_soft += k.e_teacher;
        outside += select(k.student_support, 0.0, k.e_teacher);  // p's mass outside q's support, P0
        largest_d = select(k.student_support, select(k.d > largest_d, k.d, largest_d), largest_d);
    }
    const double student_sum = student_soft.sum(), teacher_sum = teacher_soft.sum();
    const double log_ratio =
        log_ratio_sum(chunk, n, student_sum, largest_d.max(), outside.sum(), teacher_sum, temperature);

    // The student's top class: x, u and e^x there, and its G (for the classes where G - G_top is taken as a
    // difference, below).
    const MixtureTerms mixture(problem.divergence, problem.beta, problem.skew);
    const double top_x = (top_gap - shift) / temperature - log_ratio;
    const double top_exp_x = std::exp(top_x), top_u = std::expm1(top_x);
    double top_g;
    {
        const double top_q = std::exp((static_cast<double>(student[top]) - student_max) / temperature) / student_sum;
        double g[lanes];
        mixture.at(V(top_q), V(top_q * top_exp_x), V(top_x), V(top_u)).g.store(g);
        top_g = g[0];
    }

    // The divergence and E_q[G]. G waits in the gradient's row for E_q[G], where computing it again would cost its
    // logarithms twice: as G - G_top, rounded to T. That difference is what the gradient's G - E_q[G] is made of, so
    // T's rounding is relative to it; G itself can be far larger (where one side rules out a class that the other
    // gives mass, G is near a constant elsewhere: float32's rounding of G missed the gradient's tolerance by 1.3x).
    // Nor is it taken as a difference of the two G's (which left float64 gradients 3e-12 of their largest entry off
    // there), but from u and du = u - u_top = e^(x_top) expm1(d - d_top) (less_top), in which L and the shift
    // cancel; e^(x_top) <= n (q_top >= 1 / n). Where d - d_top is too large for fast_expm1, or u is not finite, G is
    // near a constant, and the difference of the two serves.
    T* gradient = problem.gradient != nullptr ? problem.gradient + r * problem.gradient_stride : nullptr;
    V divergence_lanes(0.0), mean_lanes(0.0);
    for (std::size_t c = 0; c < n; c += lanes) {
        const Chunk k = chunk(c);
        const V q = k.e_student / student_sum, x = k.d - log_ratio;
        const V exp_x = fast_exp2(x, natural), u = fast_expm1(x, exp_x);
        // Where the student has no mass, p from the teacher's own exponential (x is -inf or NaN there).
        const V p = select(k.student_support, q * exp_x, k.e_teacher / teacher_sum);
        const MixtureClasses at = mixture.at(q, p, select(k.student_support, x, 0.0), u);
        divergence_lanes += select(k.student_support | k.teacher_support, at.term, 0.0);
        const V by_difference = at.g - top_g;
        V less_top =
            select(k.apart < V(700.0), mixture.less_top(u, top_u, top_exp_x * fast_expm1(k.apart)), by_difference);
        less_top = select(magnitude(u) < V(std::numeric_limits<double>::max()), less_top, by_difference);
        mean_lanes += select(k.student_support, q * less_top, 0.0);
        if (gradient == nullptr) continue;
        double values[lanes];
        less_top.store(values);
        for (std::size_t i = 0; i < lanes && c + i < n; ++i) gradient[c + i] = static_cast<T>(values[i]);
    }
    const double soft_loss = temperature * temperature * divergence_lanes.sum(), mean = mean_lanes.sum();

    ExactHardTerm<T> labels = exact_hard_term(problem, r, student, student_max);
    labels.set_sums(hard_maxima.sum(), hard_rest.sum());
    const double hard = hard_term ? labels.loss() : 0.0;
    if (problem.row_hard_losses != nullptr) {
        problem.row_losses[row] = soft_loss;
        problem.row_hard_losses[row] = hard;
    } else {
        problem.row_losses[row] = problem.soft_weight * soft_loss + (hard_term ? problem.hard_weight * hard : 0.0);
    }

    if (gradient == nullptr) return;
    const double soft_scale = problem.gradient_scale * problem.soft_weight * temperature;
    const double hard_scale = problem.gradient_scale * problem.hard_weight;
    for (std::size_t c = 0; c < n; c += lanes) {
        const Chunk k = chunk(c);
        double values[lanes];
        for (std::size_t i = 0; i < lanes; ++i) values[i] = c + i < n ? static_cast<double>(gradient[c + i]) : 0.0;
        V g = soft_scale * (k.e_student / student_sum) * (V::load(values) - mean);
        if (hard_term) g += labels.gradient(fast_exp2(k.ds, natural), k.ds, hard_scale);
        select(k.student_support, g, 0.0).store(values);
        for (std::size_t i = 0; i < lanes && c + i < n; ++i)
            gradient[c + i] = static_cast<T>(hard_term ? labels.less_target(values[i], c + i, hard_scale) : values[i]);
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
