#pragma once

// The reverse Kullback-Leibler divergence KL(q || p), MiniLLM's mode-seeking soft term, as a policy of
// terms.hpp. With the notation of forward_kl.hpp (ds, dt centred logits, Z_s, Z_t their sums of exp(. / T)):
//   KL(q || p) = sum_c q_c (ds_c - dt_c) / T - log Z_s + log Z_t,
//   d (T^2 KL) / d s_j = q_j (r_j - E_q[r]),   r = ds - dt,
// since d KL / d(s_j / T) = q_j (log q_j - log p_j - KL) and log q_j - log p_j - KL = (r_j - E_q[r]) / T. The
// gradient pass needs r, which the exponential pass stores where forward KL stores e^(dt/T).
//
// A class the student rules out (q_c = 0, a -inf logit or an exponential flushed to 0) contributes nothing, to
// the loss or the gradient, whatever the teacher says there. A class that only the teacher rules out makes the
// divergence infinite: the row's loss is +inf, and its gradient NaN where the student has mass (the loss has no
// derivative there) and 0 elsewhere.

#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

struct ReverseKL {
    static constexpr bool second_pass = false;
    static constexpr bool exact_rows = true;
    static constexpr bool dense_teacher = true;

    template <class V>
    struct Sums {
        // Z_t is summed as Z_t - Z_s, for the reason forward_kl.hpp gives with the roles swapped: the loss
        // needs log Z_t - log Z_s, tiny when student and teacher agree.
        V student_soft;     // Z_s
        V soft_difference;  // Z_t - Z_s
        V student_cross;    // sum_c exp(ds_c / T) (ds_c - dt_c)

        static Sums neutral() noexcept { return {1.0, 0.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.student_soft...);
        f(sums.soft_difference...);
        f(sums.student_cross...);
    }

    template <class T>
    struct Partials {
        Pack<T> student_soft, difference, student_cross;

        // The block at element i of a row, given its centred logits and their difference (exponentials in
        // lane_math.hpp); stores e^(ds/T) and r = ds - dt, and returns e^(ds/T).
        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Pack<T>& ds, const Pack<T>& ds_summed, const Pack<T>& dt,
                                  const LogitDifference<T>& logits, Exp2Scale<T> soft, const Skipped& skipped,
                                  const RowBuffers<T>& row) noexcept {
            const Pack<T> e_student = fast_exp2(ds, soft);
            const Pack<T> e_teacher = fast_exp2(dt, soft);
            const Pack<T> r = logits.student_less_teacher();
            e_student.store(row.student_soft + i);
            r.store(row.divergence_term + i);
            const Pack<T> e_student_summed = summed(e_student, T(0), skipped);
            student_soft += e_student_summed;
            difference += summed(Pack<T>(e_teacher - e_student), T(0), skipped);
            // Where the student's probability is 0 (flushed, or a skipped lane) the term is 0, even at a teacher
            // -inf: the comparison fast_exp2 makes for the same flush.
            student_cross =
                select(ds_summed < Pack<T>(soft.lowest_x), student_cross, student_cross + e_student_summed * r);
            return e_student;
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.student_soft += widen(student_soft);
            totals.soft_difference += widen(difference);
            totals.student_cross += widen(student_cross);
            student_soft = difference = student_cross = Pack<T>();
        }
    };

    // KL(q || p), with log Z_s - log Z_t = -log(1 + (Z_t - Z_s) / Z_s) as in forward_kl.hpp.
    template <class T, class V>
    static KDLOSS_INLINE V divergence(const Sums<V>& sums, double temperature) noexcept {
        return sums.student_cross / (sums.student_soft * temperature) +
               log1p_to_tolerance<T>(sums.soft_difference / sums.student_soft);
    }

    static constexpr ExactKind exact_kind = ExactKind::reverse_kl;

    // Rows whose gradient entry at the student's top class k is taken from the others' (top_entry.hpp): a nearly
    // one-hot student. Its e^0 = 1 at k is all but the whole of Z_s, and the kernels' entry there, q (r - E_q[r]), a
    // difference of two numbers near r_k. Float's 2^-24 of r_k is 1e-5 of that entry below Z_s - 1 ~ 1/160; double's
    // 2^-53, 1e-12 of it below ~1e-4 (a margin of 10 over each).
    static constexpr bool top_from_others = true;
    template <class T, class V>
    static KDLOSS_INLINE auto nearly_one_hot(const Sums<V>& sums) noexcept {
        constexpr double margin = std::is_same_v<T, float> ? 1.0 / 16 : 1e-3;
        return sums.student_soft < V(1.0 + margin);
    }
    // What the other entries share (top_entry.hpp): E_q[r]'s rounding, with terms_bound's 2 |mean|, times the
    // coefficients' scale and the others' mass Z_s - 1. A float Z_s is summed in float, which leaves its Z_s - 1 some
    // ulps of 1 (2^-20 more, for them).
    template <class T, class V>
    static KDLOSS_INLINE Pack<T> shared_terms(const Sums<V>& sums, const CentredGradient<T>& k) noexcept {
        constexpr double rounding = std::is_same_v<T, float> ? 0x1p-20 : 0x1p-49;
        const V rest = sums.student_soft - 1.0;
        return T(2) * k.scale * magnitude(k.mean) * narrow<T>(select(rest < V(0.0), V(0.0), rest) + rounding);
    }

    // The size of the two terms `divergence` is the difference of, for redo_inexact_rows (exact_row.hpp), as a
    // quotient without a division or a logarithm: |cross / (Z T)| + |log(1 + r)|, r = difference / Z, is about
    // (|cross| + T |difference|) / (Z T) (within a factor 1.5 wherever |r| < 1/2; larger |r|, which only a row
    // far from a match has, overstates it).
    template <class V>
    static KDLOSS_INLINE V terms_size_numerator(const Sums<V>& sums, double temperature) noexcept {
        return absolute(sums.student_cross) + temperature * absolute(sums.soft_difference);
    }
    template <class V>
    static KDLOSS_INLINE V terms_size_denominator(const Sums<V>& sums, double temperature) noexcept {
        return sums.student_soft * temperature;
    }

    // For redo_inexact_rows, as forward_kl.hpp's, with 1 / max q = Z_s.
    template <class T>
    static constexpr double redo_fraction = std::is_same_v<T, float> ? 1.0 / 16 : 1.0 / 1024;
    template <class V>
    static KDLOSS_INLINE V inverse_largest_probability(const Sums<V>& sums) noexcept {
        return sums.student_soft;
    }

    // The gradient's soft term: weight q (r - E_q[r]) = scale e^(ds/T) (r - mean) (CentredGradient).
    template <class T>
    struct Coefficients : CentredGradient<T> {
        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double weight, double) noexcept {
            Pack<T> mean = narrow<T>(sums.student_cross / sums.student_soft);
            // An infinite mean (a class only the teacher rules out) leaves no derivative: NaN, not -inf.
            mean = select(mean == Pack<T>(std::numeric_limits<T>::infinity()),
                          Pack<T>(std::numeric_limits<T>::quiet_NaN()), mean);
            return {{narrow<T>(weight / sums.student_soft), mean}};
        }
    };
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
