#pragma once

// The divergences against a mixture m = a p + b q of the teacher's p = softmax(t/T) and the student's
// q = softmax(s/T), as one policy of terms.hpp:
//   jsd              D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
//   skew_forward_kl  D = KL(p || m),                               m = skew p + (1 - skew) q
//   skew_reverse_kl  D = KL(q || m),                               m = (1 - skew) p + skew q
// Each is D = Σ_c [w_p p_c log u_c + w_q q_c log v_c] with u = p/m and v = q/m, weights (w_p, w_q) =
// (beta, 1 - beta), (1, 0) and (0, 1). Which one, and its parameter, are run-time values (MixtureWeights): one
// compiled kernel serves all three but for the second pass's loop, one for each (with_second_pass).
//
// The logarithms need the row's Z_s and Z_t, so the divergence takes a second pass (SecondPass), over the
// exponentials the first one stored: p = e^(dt/T) / Z_t and q = e^(ds/T) / Z_s, each to T's precision
// relative to itself, and m a sum of two non-negative terms, which cannot cancel. log u = log(p/m) is then a
// logarithm of a number known to a few ulps, so exact to a few ulps absolutely, whatever the magnitudes (jsd,
// which takes both log u and log v, takes them as log(1 + r) and log r, r the smaller part of m over the
// larger, SecondPass::add); the
// log of each side's probability alone (log p = dt/T - log Z_t) would carry the rounding of |dt/T|, which is
// larger wherever the logits are. Where either side's exponential is 0 (a -inf logit, or one below T's
// smallest normal number, which each exponential is flushed to) its term is 0, as 0 log 0 is: what is left
// out is below 1e-38 of the row.
//
// The gradient. With G_j = dD/dq_j (q taken as free), d(T^2 D)/ds_j = T q_j (G_j - E_q[G]), where G may be
// shifted by any constant. With x = (the teacher's part of m) / m and 1 - x = (the student's part) / m:
//   jsd: G = (1 - beta) log(1 - x),  skew_forward_kl: G = -(1 - skew) u,
//   skew_reverse_kl: G = log(1 - x) + x,
// the mixture's own derivatives cancelling in jsd's. Each is shifted so that G -> 0 where the student's mass
// dominates (x -> 0): where a row saturates, the student's confident class has q near 1 and a gradient near 0,
// G - E_q[G] is a difference of two numbers near 0 there, not of two near a constant, and keeps its relative
// precision (log_one_minus). The second pass stores G where the first stored e^(dt/T), and sums E_q[G] on
// the way: the gradient pass is then reverse_kl.hpp's, q (G - E_q[G]) centred in T as exactly as it can be.
// Every mixture is finite wherever either side has mass: m > 0 there.

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"
#include "kdloss/divergence.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// m = teacher p + student q; the loss weighs Σ p log u by teacher_term and Σ q log v by student_term. The
// weights' logarithms are exact to the last bit: log(1 - w) by log1p, since log of the rounded 1 - w would
// shift every term of a small loss by an ulp of 1.
struct MixtureWeights {
    Divergence divergence;
    double teacher, student;
    double teacher_term, student_term;
    double log_teacher, log_student;
};

template <class T>
MixtureWeights mixture_weights(const BatchProblem<T>& problem) noexcept {
    const double beta = problem.beta, skew = problem.skew;
    switch (problem.divergence) {
        case Divergence::skew_forward_kl:
            return {problem.divergence, skew, 1.0 - skew, 1.0, 0.0, std::log(skew), std::log1p(-skew)};
        case Divergence::skew_reverse_kl:
            return {problem.divergence, 1.0 - skew, skew, 0.0, 1.0, std::log1p(-skew), std::log(skew)};
        default: return {Divergence::jsd, beta, 1.0 - beta, beta, 1.0 - beta, std::log(beta), std::log1p(-beta)};
    }
}

// The soft term a problem's divergence is computed as: each KL by its own policy, and the mixtures by Mixture,
// except where their parameter makes them a KL exactly (jsd at beta 0 and 1, TRL's definition; skew 0).
enum class SoftTerm { none, forward_kl, reverse_kl, mixture, sparse };

template <class T>
SoftTerm soft_term(const BatchProblem<T>& problem) noexcept {
    if (problem.soft_weight == 0.0) return SoftTerm::none;
    if (problem.sparse != nullptr) return SoftTerm::sparse;  // forward KL only (DistillationLoss checks it)
    switch (problem.divergence) {
        case Divergence::forward_kl: return SoftTerm::forward_kl;
        case Divergence::reverse_kl: return SoftTerm::reverse_kl;
        case Divergence::jsd:
            return problem.beta == 0.0   ? SoftTerm::forward_kl
                   : problem.beta == 1.0 ? SoftTerm::reverse_kl
                                         : SoftTerm::mixture;
        case Divergence::skew_forward_kl: return problem.skew == 0.0 ? SoftTerm::forward_kl : SoftTerm::mixture;
        case Divergence::skew_reverse_kl: return problem.skew == 0.0 ? SoftTerm::reverse_kl : SoftTerm::mixture;
    }
    return SoftTerm::forward_kl;
}

// log(1 - x) for x in [0, 1], given x and y = 1 - x each to T's precision relative to itself (the skews' log y
// and log x), and log(1 - x) + x in plus_x (skew_reverse_kl's G), each exact relative to itself however small x:
//   float: one logarithm, fast_log's, for both. Where y >= sqrt(1/2) (x <= 0.29) fast_log would split y as
//     2^0 (1 + t) with t = y - 1, which is -x but for y's rounding; -x itself is exact and in the polynomial's
//     range, so log(1 - x) = -x + tail(-x) and log(1 - x) + x = tail(-x) (log_one_plus_tail), whose terms have
//     one sign. Elsewhere log y, and log y + x, where no more than 6/7 cancels (|log(1 - x) + x| >= 0.052
//     there, |log y| >= 0.35). (double's way below, a series of its own for log(1 - x) + x, costs more.)
//   double: log(y), corrected by the part of x that y lost to rounding, c = (1 - y) - x, exact where y >= 1/2
//     (Sterbenz): log(y + c) = log(y) + c / y to first order, and c in place of c / y leaves out c x / y,
//     under 2 |c| <= 2^-p of log(1 - x) itself (|log(1 - x)| >= x); fast_log(y) is exact relative to itself
//     near 1. Then log(1 - x) + x for x <= 1/4 by a series whose terms have one sign (it is -x^2/2 there, which
//     log(1 - x) + x would lose to cancellation): log(1 - x) = -2 atanh(w), w = x / (2 - x) = x / (1 + y),
//     where x - 2w = -x w leaves log(1 - x) + x = -w (x + 2 w^2 (1/3 + w^2/5 + w^4/7 + ...)), w <= 1/7: terms
//     to w^18/21 leave out less than double's rounding (a polynomial in x would take some twenty terms);
//     elsewhere log(1 - x) + x, where no more than a tenth cancels.
// (plus_x is an out-parameter, not half of a returned pair: g++ moved such a pair of Packs through general
// registers, which cost the second pass a sixth of its time.)
template <class T>
KDLOSS_INLINE Pack<T> log_one_minus(const Pack<T>& x, const Pack<T>& y, Pack<T>& plus_x) noexcept {
    if constexpr (std::is_same_v<T, float>) {
        // y below sqrt(1/2) rounded down, where log_argument splits it: its exponent is 0 wherever this is false,
        // but where y is NaN, which goes on with t = -x, NaN too, as a NaN should.
        const Mask<T> far = y < Pack<T>(0x1.6a09e6p-1f);
        const LogArgument<Pack<T>> a = log_argument(y);
        const Pack<T> t = select(far, a.t, T(0) - x);
        // Where far, log y corrected by what y lost to rounding, as double's is (below): exact for y >= 1/2, and
        // within an ulp of 1 below, where |log y| > 0.69.
        const Pack<T> correction = select(far, (T(1) - y) - x, Pack<T>());
        const Pack<T> tail = log_one_plus_tail(t, a.exponent * float_ln2_lo + correction);
        const Pack<T> log = (t + tail) + a.exponent * float_ln2_hi;
        plus_x = select(far, log + x, tail);
        return log;
    } else {
        const Pack<T> log = fast_log(y) + select(x > Pack<T>(T(0.5)), Pack<T>(), (T(1) - y) - x);
        const Pack<T> w = x / (T(1) + y);
        const Pack<T> w2 = w * w;
        Pack<T> series = T(1) / T(21);
        for (int k = 9; k >= 1; --k) series = series * w2 + T(1) / T(2 * k + 1);
        plus_x = select(x > Pack<T>(T(0.25)), log + x, T(0) - w * (x + T(2) * w2 * series));
        return log;
    }
}
template <class T>
KDLOSS_INLINE Pack<T> log_one_minus(const Pack<T>& x, const Pack<T>& y) noexcept {
    Pack<T> unused;  // and not computed
    return log_one_minus(x, y, unused);
}

struct Mixture {
    static constexpr bool second_pass = true;
    static constexpr bool exact_rows = true;
    static constexpr bool dense_teacher = true;

    template <class V>
    struct Sums {
        V student_soft;  // Z_s
        V teacher_soft;  // Z_t
        V divergence;    // D itself, from the second pass
        V mean;          // E_q[G], from the second pass

        static Sums neutral() noexcept { return {1.0, 1.0, 0.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.student_soft...);
        f(sums.teacher_soft...);
        f(sums.divergence...);
        f(sums.mean...);
    }

    // The first pass: the exponentials, stored, and their sums.
    template <class T>
    struct Partials {
        Pack<T> student_soft, teacher_soft;

        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Pack<T>& ds, const Pack<T>&, const Pack<T>& dt,
                                  const LogitDifference<T>& logits, Exp2Scale<T> soft, const Skipped& skipped,
                                  const RowBuffers<T>& row) noexcept {
            const Pack<T> e_student = fast_exp2(ds, soft);
            const Pack<T> e_teacher = fast_exp2(dt, soft);
            e_student.store(row.student_soft + i);
            e_teacher.store(row.divergence_term + i);
            if (row.logit_difference != nullptr) logits.teacher_less_student().store(row.logit_difference + i);
            student_soft += summed(e_student, T(0), skipped);
            teacher_soft += summed(e_teacher, T(0), skipped);
            return e_student;
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.student_soft += widen(student_soft);
            totals.teacher_soft += widen(teacher_soft);
            student_soft = teacher_soft = Pack<T>();
        }
    };

    // The second pass, once Z_s and Z_t are known (from one row's sums, V = double, or a block's, V =
    // Pack<double>): D's terms and, for the gradient, E_q[G], with G returned for the caller to store over
    // e^(dt/T) (see second_pass in lane_math.hpp). One type for each divergence, so that its loop holds only its
    // own arithmetic (with_second_pass picks it).
    template <class T, bool Gradient, Divergence Kind>
    struct SecondPass {
        // Packs, not scalars: a scalar would be broadcast again at each use inside the loop.
        Pack<T> teacher, student;            // the parts' weights: of e^(dt/T) and of e^(ds/T) (skews, see add)
        Pack<T> log_teacher, log_student;    // the mixture's weights' logarithms
        Pack<T> minus_student_over_teacher;  // -student / teacher (the mixture's weights)
        // jsd: log2 of (the teacher's part of m) / (the student's) is logit_scale (dt - ds) + log2_part_ratio,
        // and the parts' weights per exponential, 2^64 teacher_term / Z_t and 2^64 student_term / Z_s.
        Pack<T> logit_scale, log2_part_ratio;
        Pack<T> teacher_weight, student_weight;
        Pack<T> divergence_sum, mean;  // partial sums over a chunk
        // What the partial sums are multiplied by as they are added up in double (the skews sum e^(dt/T) and
        // e^(ds/T) times their terms: the 1 / Z comes out of the loop).
        Pack<double> divergence_scale, mean_scale;

        template <class V>
        static SecondPass from_sums(const Sums<V>& sums, const BatchProblem<T>& problem) noexcept {
            const MixtureWeights w = mixture_weights(problem);
            // The parts (the skews' m, jsd's ratio r) scaled by 2^64, exactly: a part below T's smallest normal
            // number would make a reciprocal infinite and x, y or r lose their precision (the parts are then at
            // least 2^-62 times their weight over n, and at most 2^64 n).
            constexpr double part_scale = 18446744073709551616.0;
            if constexpr (Kind == Divergence::jsd) {
                const V log2_part_ratio =
                    log2e * (w.log_teacher - w.log_student + fast_log(sums.student_soft / sums.teacher_soft));
                // A row whose sums are NaN (NaN or +inf logits) must have a NaN gradient. jsd's lambda may hide
                // it (its second pass makes NaN lambdas finite, see add), so G's factor carries it: 0
                // log2_part_ratio is 0, or NaN (the sums are at least 1, never infinite).
                const V student_with_nan = w.student + 0.0 * log2_part_ratio;
                return {Pack<T>(),
                        narrow<T>(student_with_nan),
                        Pack<T>(static_cast<T>(w.log_teacher)),
                        Pack<T>(static_cast<T>(w.log_student)),
                        Pack<T>(),
                        Pack<T>(exp2_scale<T>(log2e / problem.temperature).scale),  // as soft_exponent's
                        narrow<T>(log2_part_ratio),
                        narrow<T>(w.teacher_term * part_scale / sums.teacher_soft),
                        narrow<T>(w.student_term * part_scale / sums.student_soft),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<double>(1.0 / part_scale),
                        Pack<double>(1.0 / part_scale)};
            } else {
                const V inverse_student = 1.0 / sums.student_soft;
                const V inverse_teacher = 1.0 / sums.teacher_soft;
                return {Pack<T>(static_cast<T>(w.teacher * part_scale)),
                        narrow<T>(w.student * part_scale * sums.teacher_soft * inverse_student),
                        Pack<T>(static_cast<T>(w.log_teacher)),
                        Pack<T>(static_cast<T>(w.log_student)),
                        Pack<T>(static_cast<T>(-w.student / w.teacher)),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<T>(),
                        Pack<double>(Kind == Divergence::skew_forward_kl ? inverse_teacher : inverse_student),
                        Pack<double>(inverse_student)};
            }
        }

        // The block at element i, given what stage stored for it (the skews); returns G (Gradient), or nothing of
        // use.
        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Skipped& skipped, const RowBuffers<T>& row,
                                  [[maybe_unused]] const T* staged) noexcept {
            const Pack<T> e_student = Pack<T>::load(row.student_soft + i);
            const Pack<T> e_teacher = Pack<T>::load(row.divergence_term + i);
            if constexpr (Kind == Divergence::jsd) {
                // Both log x and log y, x = (the teacher's part of m) / m and y = 1 - x = (the student's part) / m.
                // With r = (the smaller part) / (the larger) and l = log(1 + r) = log(m / the larger part),
                //   log(larger part / m) = -l  and  log(smaller part / m) = log r - l,
                // no cancellation but the last addition's. r comes from the parts, one division (which costs
                // less than an exponential of the logits), and is good to a few ulps, as l is then; log r, which
                // can be large, from the logits without a logarithm: log2 r = -a, a = |lambda|, lambda =
                // log2(x / y) = (dt - ds) log2(e) / T + log2(beta Z_s / ((1 - beta) Z_t)). lambda carries the
                // rounding of dt - ds as e^(dt/T) and e^(ds/T) carry that of dt and ds: its error moves log(smaller
                // / m) by about a ulps, where the smaller part weighs 2^-a of the larger. Where a side's logit is
                // -inf (a infinite), or both sides' (a NaN), a is made finite, so that every term is a 0 weight
                // times a finite logarithm: 0, as 0 log 0 is (NaN logits make the row's sums NaN already); where
                // both parts are 0, the larger is taken as T's smallest normal number, which leaves r = 0.
                const Pack<T> log2_ratio = Pack<T>::load(row.logit_difference + i) * logit_scale + log2_part_ratio;
                const Mask<T> teacher_larger = log2_ratio > Pack<T>();
                const Pack<T> magnitude = from_bits(to_bits(log2_ratio) & (~BitsOf<T>(0) >> 1));  // |log2_ratio|
                const Pack<T> a = select(Pack<T>(T(1e30)) > magnitude, magnitude, T(1e30));       // NaN: 1e30
                // The parts, beta p and (1 - beta) q, scaled by 2^64 (divergence_scale and mean_scale take it out
                // again), as the skews' are: the smaller part is normal wherever its weight is above 2^-62 n.
                const Pack<T> teacher_part = teacher_weight * e_teacher, student_part = student_weight * e_student;
                // Which part is the smaller is the parts' own to say here: where an exponential was flushed to 0,
                // lambda may say otherwise (and r would be out of range).
                const Mask<T> teacher_smaller = teacher_part < student_part;
                const Pack<T> smaller = select(teacher_smaller, teacher_part, student_part);
                const Pack<T> larger = select(teacher_smaller, student_part, teacher_part);
                constexpr T smallest = std::numeric_limits<T>::min();
                const Pack<T> l = log_one_plus(smaller / select(larger < Pack<T>(smallest), smallest, larger));
                const Pack<T> log_larger = T(0) - l, log_smaller = a * T(-0.6931471805599453) - l;  // ln 2
                const Pack<T> log_x = select(teacher_larger, log_larger, log_smaller);
                const Pack<T> log_y = select(teacher_larger, log_smaller, log_larger);
                // D = beta sum p log(x / beta) + (1 - beta) sum q log(y / (1 - beta)); G = (1 - beta) log y.
                divergence_sum +=
                    summed(Pack<T>(teacher_part * (log_x - log_teacher) + student_part * (log_y - log_student)), T(0),
                           skipped);
                if constexpr (Gradient) mean += summed(Pack<T>(student_part * log_y), T(0), skipped);
                return student * log_y;
            }
            // The skews: x and y from stage (below), and log(1 - x) or log(1 - y) from both (log_one_minus).
            const Pack<T> x = Pack<T>::load(staged), y = Pack<T>::load(staged + lanes);
            Pack<T> g;
            if constexpr (Kind == Divergence::skew_forward_kl) {
                // D = sum p log(p / m) = sum p log(x / skew); G = -(1 - skew) p / m = -(1 - skew) / skew x.
                divergence_sum += summed(Pack<T>(e_teacher * (log_one_minus(y, x) - log_teacher)), T(0), skipped);
                if constexpr (Gradient) g = minus_student_over_teacher * x;
            } else {
                // D = sum q log(q / m) = sum q log(y / skew); G = log y + x.
                const Pack<T> log_y = log_one_minus(x, y, g);
                divergence_sum += summed(Pack<T>(e_student * (log_y - log_student)), T(0), skipped);
            }
            if constexpr (Gradient) mean += summed(Pack<T>(e_student * g), T(0), skipped);
            return g;
        }

        // The skews' first loop (second_pass, lane_math.hpp): x and y of the block at element i, into out[0, lanes)
        // and out[lanes, 2 lanes). x and y themselves, as quotients of the parts by m' = 2^64 Z_t m, each to T's
        // precision relative to itself: one division here and one logarithm in add, which cost less than the
        // exponential that jsd's way would need for x. Where neither side has mass, m' is taken as T's smallest
        // normal number instead of 0, which leaves x = y = 0 and every term 0 (a NaN m' stays NaN).
        static constexpr std::size_t staged = Kind == Divergence::jsd ? 0 : 2;
        KDLOSS_INLINE void stage(std::size_t i, const RowBuffers<T>& row, T* out) const noexcept {
            const Pack<T> teacher_part = teacher * Pack<T>::load(row.divergence_term + i);
            const Pack<T> student_part = student * Pack<T>::load(row.student_soft + i);
            const Pack<T> mixture = teacher_part + student_part;
            constexpr T smallest = std::numeric_limits<T>::min();
            const Pack<T> to_mixture = T(1) / select(mixture < Pack<T>(smallest), smallest, mixture);
            Pack<T>(teacher_part * to_mixture).store(out);
            Pack<T>(student_part * to_mixture).store(out + lanes);
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.divergence += widen(divergence_sum) * divergence_scale;
            totals.mean += widen(mean) * mean_scale;
            divergence_sum = mean = Pack<T>();
        }
    };

    // run(pass) with the SecondPass of the problem's divergence, from its sums.
    template <class T, bool Gradient, class V, class Run>
    static KDLOSS_INLINE void with_second_pass(const Sums<V>& sums, const BatchProblem<T>& problem, Run&& run) {
        switch (problem.divergence) {
            case Divergence::skew_forward_kl:
                run(SecondPass<T, Gradient, Divergence::skew_forward_kl>::from_sums(sums, problem));
                return;
            case Divergence::skew_reverse_kl:
                run(SecondPass<T, Gradient, Divergence::skew_reverse_kl>::from_sums(sums, problem));
                return;
            default: run(SecondPass<T, Gradient, Divergence::jsd>::from_sums(sums, problem));
        }
    }

    template <class T, class V>
    static KDLOSS_INLINE V divergence(const Sums<V>& sums, double) noexcept {
        return sums.divergence;
    }

    // redo_inexact_rows' formula for these terms, and no top entry from the others (top_entry.hpp): G is centred on
    // the student's dominant class already, see the top of this file.
    static constexpr ExactKind exact_kind = ExactKind::mixture;
    static constexpr bool top_from_others = false;

    // D is a sum of terms here, not a difference of two: only its own size says whether redo_inexact_rows
    // (exact_row.hpp) computes it again. Each term's logarithm is good to a few ulps of its size, the logits'
    // spread over T, which leaves D an absolute error of some ulps of T's precision times that spread (a few 1e-7
    // in float32, measured on flat rows at T = 6 to 20): as if D were a difference of terms of size 3.2, which
    // takes float32 rows with D below 0.05 and float64 rows below 3e-3.
    template <class V>
    static KDLOSS_INLINE V terms_size_numerator(const Sums<V>&, double) noexcept {
        return V(3.2);
    }
    template <class V>
    static KDLOSS_INLINE V terms_size_denominator(const Sums<V>&, double) noexcept {
        return V(1.0);
    }

    // For redo_inexact_rows: the fractions the size above is taken with, and no floor from the exponentials' rounding
    // (a largest probability of 0, one over it infinite): each of D's terms is rounded relative to itself.
    template <class T>
    static constexpr double redo_fraction = std::is_same_v<T, float> ? 1.0 / 64 : 1.0 / 1024;
    template <class V>
    static KDLOSS_INLINE V inverse_largest_probability(const Sums<V>&) noexcept {
        return V(std::numeric_limits<double>::infinity());
    }

    // The gradient's soft term: weight T q (G - E_q[G]) = scale e^(ds/T) (G - mean) (CentredGradient).
    template <class T>
    struct Coefficients : CentredGradient<T> {
        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double weight, double temperature) noexcept {
            return {{narrow<T>(weight * temperature / sums.student_soft), narrow<T>(sums.mean)}};
        }
    };
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
