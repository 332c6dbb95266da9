#pragma once

// Rows whose divergence the kernels' form would lose to cancellation, computed again from the relative
// difference of the two distributions (issue 20).
//
// The kernels compute KL as a difference of two terms (forward_kl.hpp: a cross term and log Z_s - log Z_t),
// each as large as the logits' spread over T, and the gradient as q - p. Where the student is close to the
// teacher, or T is large, the divergence is far smaller than those terms and than q, and both lose to
// cancellation what T's precision is of the terms: float32's result was wrong in its second digit for a student
// within 1e-3 of the teacher, and in its sign at T = 1e5. Such rows are recognised from their sums
// (redo_inexact_rows: the kernels' own result, small against the terms it is a difference of, against the rounding
// of the exponentials, or small outright) and computed again here, in double, from
//   x_c = log(p_c / q_c) = d_c - L,  d_c = ((t_c - s_c) - (max t - max s)) / T,  L = log sum_c q_c e^(d_c),
// where t_c - s_c is formed before anything else (exact for float logits, and where t and s are close), and
// u_c = p_c / q_c - 1 = expm1(x_c):
//   forward KL(p || q) = sum_c q_c phi(u_c),  phi(u) = (1 + u) log1p(u) - u,  d(T^2 KL)/ds_c = -T q_c u_c,
//   reverse KL(q || p) = sum_c q_c psi(u_c),  psi(u) = u - log1p(u),          d(T^2 KL)/ds_c = -T q_c (x_c + KL),
// (using sum_c q_c u_c = 0) with every term non-negative, phi and psi by their series near 0 (u^2/2 there), so
// that nothing cancels. An error e in L moves the sum by about e times itself. L comes from
// log1p(sum_c q_c expm1(d_c)), exact relative to L however small. Where p_c is far from q_c (|x_c| > 1), the
// terms are taken in the log domain instead, p x - (p - q) and (p - q) - q x with p = e^(log q + x), where
// nothing cancels either: no exponential of a large d overflows, and no u_c = e^x - 1 rounds to -1.
// Reverse KL's gradient is centred on the student's top class k: x_c + KL = (x_c - x_k) - sum_j q_j (x_j - x_k),
// where x_c - x_k = d_c - d_k leaves L out, and the top class's own term is 0. Where the student is nearly one-hot
// (q_k near 1, rows that saturate at a low T), x_k + KL is a difference of two numbers near x_k; this way it is
// the small sum over the other classes, which keeps its relative precision.
//
// The KLs on Packs of doubles (exact_kl_row.hpp, with the kernels' exp2, log1p and fast_expm1: in a float64 call where
// the student has all but caught up with the teacher every row comes here, and scalar libm made such a call 85 times an
// ordinary one, now about 20); the mixtures here, in plain scalar double with libm. The hard term is computed again
// too, since the gradient's row is written whole.

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/exact_hard_term.hpp"
#include "kdloss/detail/exact_kl_row.hpp"
#include "kdloss/detail/forward_kl.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/mixture.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/reverse_kl.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// psi(u) = u - log1p(u), u > -1 (skew reverse KL's series below; exact_kl_row.hpp's reverse KL term, there on
// Packs). Near 0 by its series, psi(u) = u^2 sum_j (-u)^j / (j + 2), to |u|^21 (below 2^-53 of the first term for
// |u| < 1/8); elsewhere no more than a factor 20 cancels.
inline double reverse_term(double u) noexcept {
    if (std::fabs(u) < 0.125) {
        double series = 0.0;
        for (int j = 19; j >= 0; --j) series = series * -u + 1.0 / (j + 2.0);
        return u * u * series;
    }
    return u - std::log1p(u);
}

// log(e^a + e^b), either may be -inf.
inline double log_add_exp(double a, double b) noexcept {
    const double larger = std::fmax(a, b), smaller = std::fmin(a, b);
    if (larger == -std::numeric_limits<double>::infinity()) return larger;
    return larger + std::log1p(std::exp(smaller - larger));
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
struct MixtureClass {
    double term, g;
};

// The formulas above for one problem: its weights, their logarithms and the series' coefficients, worked out
// once (each coefficient costs an expm1), then `at` per class.
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

    // Class terms given q, p and x = log(p / q); q = 0 (the student has no mass there, p > 0): m = a p, and G
    // unused.
    MixtureClass at(double q, double p, double x) const noexcept {
        if (q == 0.0) {
            if (kind_ == Divergence::jsd) return {-beta_ * p * log_a_, 0.0};
            if (kind_ == Divergence::skew_forward_kl) return {-p * log_a_ - (1.0 - skew_) * p, 0.0};
            return {a_ * p, 0.0};
        }
        const double u = std::expm1(x);
        if (std::fabs(u) < 0.125) {
            if (kind_ == Divergence::jsd) return {q * series(u), -(1.0 - beta_) * std::log1p(beta_ * u)};
            if (kind_ == Divergence::skew_forward_kl)
                return {q * series(u), -(1.0 - skew_) * (1.0 - skew_) * u / (1.0 + skew_ * u)};
            const double au = a_ * u;
            return {q * reverse_term(au), -std::log1p(au) + skew_ * au / (1.0 + au)};
        }
        const double log_q_over_m = -log_add_exp(log_a_ + x, log_b_);
        const double log_p_over_m = -log_add_exp(log_a_, log_b_ - x);  // not x + log(q / m), which may cancel
        if (kind_ == Divergence::jsd)
            return {(p > 0.0 ? beta_ * p * log_p_over_m : 0.0) + (1.0 - beta_) * q * log_q_over_m,
                    (1.0 - beta_) * log_q_over_m};
        if (kind_ == Divergence::skew_forward_kl)
            return {(p > 0.0 ? p * log_p_over_m : 0.0) - (1.0 - skew_) * (p - q),
                    (1.0 - skew_) * (1.0 - std::exp(log_p_over_m))};
        return {q * log_q_over_m + a_ * (p - q), log_q_over_m + skew_ * (1.0 - std::exp(log_q_over_m))};
    }

    // G at a class less G at the student's top class, given u at both and du = u - u_top (more exact than u less
    // u_top): from G's definitions above, with v = a u and w = a du / (1 + v_top),
    //   jsd: -(1 - beta) log1p(w),  skew_forward_kl: -(1 - l)^2 du / ((1 + l u)(1 + l u_top)),
    //   skew_reverse_kl: -log1p(w) + l w / (1 + v), or psi(w) - w (1 - l + v) / (1 + v) where |w| < 1/2,
    // each exact relative to itself but for the last's sum, which cancels only where G is flat (where the teacher
    // has next to no mass, v near l - 1). (Its second form for a large w would cancel: psi(w) ~ w there.)
    double less_top(double u, double u_top, double du) const noexcept {
        if (kind_ == Divergence::skew_forward_kl)
            return -(1.0 - skew_) * (1.0 - skew_) * (du / (1.0 + skew_ * u)) / (1.0 + skew_ * u_top);
        const double w = a_ * du / (1.0 + a_ * u_top);
        if (kind_ == Divergence::jsd) return -(1.0 - beta_) * std::log1p(w);
        const double v = a_ * u;
        if (std::fabs(w) < 0.5) return reverse_term(w) - w * ((1.0 - skew_) + v) / (1.0 + v);
        return -std::log1p(w) + skew_ * w / (1.0 + v);
    }

private:
    static constexpr int terms = 22;  // c_2 .. c_21

    double series(double u) const noexcept {  // sum_k c_k u^k
        double sum = 0.0;
        for (int k = terms - 1; k >= 2; --k) sum = sum * u + coefficient_[k];
        return u * u * sum;
    }

    Divergence kind_;
    double beta_, skew_, a_ = 0.0, log_a_ = 0.0, log_b_ = 0.0;
    double coefficient_[terms] = {};
};

// Rows rows[0 .. count) of a float problem computed again by the double kernels, in `widened`
// (widened_elements(classes) doubles' worth of floats): run_rows.hpp, which defines it next to the kernels' table
// it calls into.
template <class T>
void widened_rows(const BatchProblem<T>& problem, const std::size_t* rows, std::size_t count, T* widened) noexcept;

// The highest temperature at which the kernels' results are kept where redo_inexact_rows finds them accurate: above
// it their terms are of order 1/T and D of 1/T^2, and the tests of their accuracy reach T = 100
// (test_temperature_range.py), so every row is computed here.
inline constexpr double kernels_max_temperature = 100.0;

// Scalar by design (a row's terms in double, through libm). g++ 12's vectoriser for aarch64 fails on it at -O3
// with an internal compiler error (in vect_transform_reduction), so it is told not to try there.
#if defined(__GNUC__) && !defined(__clang__) && defined(__aarch64__)
#define KDLOSS_NO_VECTORISE __attribute__((optimize("no-tree-vectorize")))
#else
#define KDLOSS_NO_VECTORISE
#endif

// Row `row` of `problem` (a dense teacher, not ignored), its soft term `kind` (a KL, or the mixture
// problem.divergence): writes its loss (or its two parts) and, if the problem has one, its gradient row, over
// what the kernels wrote.
template <class T>
KDLOSS_NO_VECTORISE void exact_row(const BatchProblem<T>& problem, std::size_t row, ExactKind kind) noexcept {
    if (kind != ExactKind::mixture) {
        if (kind == ExactKind::forward_kl) exact_kl_row<true>(problem, row);
        else exact_kl_row<false>(problem, row);
        return;
    }
    const std::size_t n = problem.classes;
    const auto r = static_cast<std::ptrdiff_t>(row);
    const T* student = problem.student + r * problem.student_stride;
    const T* teacher = problem.teacher + r * problem.teacher_stride;
    const double temperature = problem.temperature;
    constexpr double minus_infinity = -std::numeric_limits<double>::infinity();

    double student_max = minus_infinity, teacher_max = minus_infinity;
    for (std::size_t c = 0; c < n; ++c) {
        student_max = std::fmax(student_max, static_cast<double>(student[c]));
        teacher_max = std::fmax(teacher_max, static_cast<double>(teacher[c]));
    }
    const double shift = teacher_max - student_max;
    // log q_c = ds_c / T - log Z_s; d_c as above; -inf logits leave q_c (or p_c) exactly 0.
    const bool hard_term = problem.hard_weight != 0.0 && problem.label_kind != LabelKind::none;
    double student_soft = 0.0, student_hard = 0.0, teacher_soft = 0.0;
    for (std::size_t c = 0; c < n; ++c) {
        const double ds = static_cast<double>(student[c]) - student_max;
        student_soft += std::exp(ds / temperature);
        if (hard_term) student_hard += std::exp(ds);
        teacher_soft += std::exp((static_cast<double>(teacher[c]) - teacher_max) / temperature);
    }
    const double log_teacher_soft = std::log(teacher_soft);
    const double log_student_soft = std::log(student_soft);
    auto log_q = [&](std::size_t c) {
        return (static_cast<double>(student[c]) - student_max) / temperature - log_student_soft;
    };
    auto d = [&](std::size_t c) {
        return ((static_cast<double>(teacher[c]) - static_cast<double>(student[c])) - shift) / temperature;
    };

    // L = log sum_c q_c e^(d_c): by log1p of sum_c q_c expm1(d_c), unless some d_c is too large for exp (a row
    // that is no near match; then as a log-sum-exp).
    double largest_d = minus_infinity;
    for (std::size_t c = 0; c < n; ++c)
        if (student[c] != -std::numeric_limits<T>::infinity()) largest_d = std::fmax(largest_d, d(c));
    double log_ratio_sum;
    if (largest_d < 600.0) {
        double sum = 0.0;
        for (std::size_t c = 0; c < n; ++c)
            if (student[c] != -std::numeric_limits<T>::infinity()) sum += std::exp(log_q(c)) * std::expm1(d(c));
        log_ratio_sum = std::log1p(sum);
    } else {
        double largest = minus_infinity;  // of log q_c + d_c
        for (std::size_t c = 0; c < n; ++c)
            if (student[c] != -std::numeric_limits<T>::infinity()) largest = std::fmax(largest, log_q(c) + d(c));
        double sum = 0.0;
        for (std::size_t c = 0; c < n; ++c)
            if (student[c] != -std::numeric_limits<T>::infinity()) sum += std::exp(log_q(c) + d(c) - largest);
        log_ratio_sum = largest + std::log(sum);
    }
    // The sums above run over the student's support; p's mass outside it, P0, makes the true L = log(Z_t / Z_s) (up
    // to the shift) larger by -log(1 - P0).
    double teacher_mass_outside = 0.0;
    for (std::size_t c = 0; c < n; ++c)
        if (student[c] == -std::numeric_limits<T>::infinity())
            teacher_mass_outside += std::exp((static_cast<double>(teacher[c]) - teacher_max) / temperature);
    if (teacher_mass_outside != 0.0) log_ratio_sum -= std::log1p(-teacher_mass_outside / teacher_soft);

    // The mixture's term and G at class c.
    const MixtureTerms mixture_terms(problem.divergence, problem.beta, problem.skew);
    auto mixture_at = [&](std::size_t c) {
        if (student[c] == -std::numeric_limits<T>::infinity()) {
            const double log_p = (static_cast<double>(teacher[c]) - teacher_max) / temperature - log_teacher_soft;
            return mixture_terms.at(0.0, std::exp(log_p), 0.0);
        }
        const double x = d(c) - log_ratio_sum, lq = log_q(c);
        return mixture_terms.at(std::exp(lq), std::exp(lq + x), x);
    };

    // The divergence and E_q[G]. G waits in the gradient's row for E_q[G], where computing it again would cost its
    // logarithms twice: as G - G_top, G at the student's top class, rounded to T. That difference is what the
    // gradient's G - E_q[G] is made of, so T's rounding is relative to it; G itself can be far larger (where one
    // side rules out a class that the other gives mass, G is near a constant elsewhere: float32's rounding of G
    // missed the gradient's tolerance by 1.3x). So G - G_top is not taken as a difference of the two either (which
    // left float64 gradients 3e-12 of their largest entry off there), but from u_top and du = u_c - u_top =
    // e^(x_top) expm1(d_c - d_top) (MixtureTerms::less_top), where d_c - d_top is formed from the two classes'
    // t - s, and L and the shift cancel. e^(x_top) <= n (q_top >= 1 / n), and du is finite unless d_c - d_top is
    // far too large for a near constant G; there, and where u_c is not finite, the difference of the two.
    std::size_t top = 0;
    while (top + 1 < n && static_cast<double>(student[top]) != student_max) ++top;
    const double top_g = mixture_at(top).g;
    const double x_top = d(top) - log_ratio_sum, u_top = std::expm1(x_top), e_top = std::exp(x_top);
    const double top_gap = static_cast<double>(teacher[top]) - static_cast<double>(student[top]);
    T* gradient = problem.gradient != nullptr ? problem.gradient + r * problem.gradient_stride : nullptr;
    double divergence = 0.0, mean = 0.0;
    for (std::size_t c = 0; c < n; ++c) {
        MixtureClass at{0.0, top_g};
        if (student[c] != -std::numeric_limits<T>::infinity() || teacher[c] != -std::numeric_limits<T>::infinity())
            at = mixture_at(c);
        divergence += at.term;
        double g = at.g - top_g;
        if (student[c] != -std::numeric_limits<T>::infinity()) {
            const double apart =
                ((static_cast<double>(teacher[c]) - static_cast<double>(student[c])) - top_gap) / temperature;
            const double u = std::expm1(d(c) - log_ratio_sum);
            if (apart < 700.0 && std::isfinite(u)) g = mixture_terms.less_top(u, u_top, e_top * std::expm1(apart));
            mean += std::exp(log_q(c)) * g;
        }
        if (gradient != nullptr) gradient[c] = static_cast<T>(g);
    }
    const double soft = temperature * temperature * divergence;

    const ExactHardTerm<T> labels = exact_hard_term(problem, r, student, student_max);
    const double log_student_hard = std::log(student_hard);
    const double hard = hard_term ? labels.loss(log_student_hard) : 0.0;

    if (problem.row_hard_losses != nullptr) {
        problem.row_losses[row] = soft;
        problem.row_hard_losses[row] = hard;
    } else {
        problem.row_losses[row] = problem.soft_weight * soft + (hard_term ? problem.hard_weight * hard : 0.0);
    }

    if (gradient == nullptr) return;
    const double soft_scale = problem.gradient_scale * problem.soft_weight * temperature;
    const double hard_scale = problem.gradient_scale * problem.hard_weight;
    for (std::size_t c = 0; c < n; ++c) {
        double g = 0.0;
        if (student[c] != -std::numeric_limits<T>::infinity()) {
            g = soft_scale * std::exp(log_q(c)) * (static_cast<double>(gradient[c]) - mean);
            if (hard_term) {
                const double h = std::exp(static_cast<double>(student[c]) - student_max - log_student_hard);
                g += hard_scale * h * labels.target_mass;
            }
        }
        if (hard_term) g = labels.less_target(g, c, hard_scale);
        gradient[c] = static_cast<T>(g);
    }
}

// Once rows[0 .. count)'s losses and gradient rows are written (a block's, or RowLosses' rows), given their
// divergences as the kernels computed them: those whose results cancellation or rounding may have spoilt (and
// reverse KL's rows whose student is nearly one-hot, below), computed again: a float row by the double kernels
// (widened_rows, in `widened`), which judge it by float's tolerance and send it on here if they must; a double row
// by exact_row. The kernels' error in D, measured
// against a high-precision truth over rows from near matches to independent logits (issue 20), has two parts:
// - some ulps of T's precision times the size of the terms D is the difference of (its soft term's terms_size): a
//   row is computed again where D is below its redo_fraction of that size;
// - a floor from the rounding of each exponential, about an ulp times sqrt(sum p^2) <= sqrt(max p) of the
//   distribution D's sums are weighted by (the soft term's largest_probability), whatever the terms' size: a row is
//   computed again where D is below 4 ulps times that over the tolerance, D^2 < rounding_floor^2 max p. (Float32 rows
//   with D from 1e-3 to 1e-2 and few classes missed the tolerance by up to 4x before this part.)
// and rows with D below 1e-3 (float; 1e-6 for double) are computed again whatever else. These keep the loss within
// 0.6 of the tolerances the library promises (float 1e-5, double 1e-12) on every kept row measured. The gradient
// (with one; gradient_size, null for the loss alone): each soft entry is a difference of terms (q and p, or q G and
// q E_q[G]), rounded relative to them, so a row is computed again where its largest soft entry is below 4 ulps over
// the tolerance of the largest such terms (GradientSize, found by the gradient pass). D does not say so: where the
// student rules out (or all but) a class that the teacher gives mass, D is about that mass, and every other entry a
// small difference of two numbers near a constant; the kernels' gradient missed by up to 1e3 times float's
// tolerance there, and 170 times double's. Such a row keeps the kernels' loss, which is accurate, so that the loss
// alone stays that of loss_and_gradient, bit for bit. Ordinary rows (T of 1 to 4, student and teacher apart) are far
// from all of these, and pay for two maxima in the gradient pass and a comparison per block of rows. Above
// kernels_max_temperature every row is computed again. A soft term may name more rows (its `saturated`) and names the
// formula (its `exact_kind`).
template <class Terms, class T>
void redo_inexact_rows(const BatchProblem<T>& problem, const typename Terms::template Sums<Pack<double>>& sums,
                       const Pack<double>& divergence, const std::size_t* rows, std::size_t count, T* widened,
                       const GradientSize<Pack<double>>* gradient_size) noexcept {
    if constexpr (Terms::exact_rows) {
        using Soft = typename Terms::SoftTerm;
        constexpr bool single = std::is_same_v<T, float>;
        if (problem.temperature > kernels_max_temperature) {
            for (std::size_t lane = 0; lane < count; ++lane) exact_row(problem, rows[lane], Soft::exact_kind);
            return;
        }
        // Each threshold is a number of ulps of T over the tolerance: a double problem that recomputes a float row
        // (float_tolerance) needs 1e-12 / 1e-5 as many.
        const double scale = problem.float_tolerance ? 1e-7 : 1.0;
        const double relative = scale * Soft::template redo_fraction<T>, small = scale * (single ? 1e-3 : 1e-6);
        const double rounding_floor = scale * (single ? 4 * 0x1p-24 / 1e-5 : 4 * 0x1p-53 / 1e-12);
        // NaN and +inf divergences compare false: such rows keep what the kernels made of them.
        const Pack<double> size = relative * Soft::terms_size_numerator(sums.soft, problem.temperature);
        const Pack<double> scaled = divergence * Soft::terms_size_denominator(sums.soft, problem.temperature);
        Mask<double> inexact = (scaled < size) | (divergence < Pack<double>(small));
        inexact = inexact |
                  (divergence * divergence < (rounding_floor * rounding_floor) * Soft::largest_probability(sums.soft));
        inexact = inexact | Soft::template saturated<T>(sums.soft);
        double loss_flag[lanes], flag[lanes];
        select(inexact, Pack<double>(1.0), Pack<double>(0.0)).store(loss_flag);
        // The gradient: a row whose soft part's largest entry is within 4 ulps over the tolerance of the terms its
        // entries are differences of (GradientSize). Its loss is kept: it is accurate, and the loss alone is then
        // that of loss_and_gradient, bit for bit.
        if (gradient_size != nullptr)
            inexact = inexact | (gradient_size->largest < rounding_floor * gradient_size->terms);
        const Pack<double> flags = select(inexact, Pack<double>(1.0), Pack<double>(0.0));
        if (flags.sum() == 0.0) return;
        flags.store(flag);
        double kept_loss[lanes] = {}, kept_hard_loss[lanes] = {};
        for (std::size_t lane = 0; lane < count; ++lane) {
            if (flag[lane] == 0.0 || loss_flag[lane] != 0.0) continue;
            kept_loss[lane] = problem.row_losses[rows[lane]];
            if (problem.row_hard_losses != nullptr) kept_hard_loss[lane] = problem.row_hard_losses[rows[lane]];
        }
        if constexpr (single) {
            // Float rows first in double, by the kernels (widened_rows): about 2.5 times a float row where the exact
            // pass takes 18 (the KLs) to 65 (the mixtures), and good to float's tolerance but for the near matches
            // that the double kernels send on to the exact pass themselves.
            std::size_t inexact_rows[lanes] = {};
            std::size_t inexact_count = 0;
            for (std::size_t lane = 0; lane < count; ++lane)
                if (flag[lane] != 0.0) inexact_rows[inexact_count++] = rows[lane];
            widened_rows(problem, inexact_rows, inexact_count, widened);
        } else {
            for (std::size_t lane = 0; lane < count; ++lane)
                if (flag[lane] != 0.0) exact_row(problem, rows[lane], Soft::exact_kind);
        }
        for (std::size_t lane = 0; lane < count; ++lane) {
            if (flag[lane] == 0.0 || loss_flag[lane] != 0.0) continue;
            problem.row_losses[rows[lane]] = kept_loss[lane];
            if (problem.row_hard_losses != nullptr) problem.row_hard_losses[rows[lane]] = kept_hard_loss[lane];
        }
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
