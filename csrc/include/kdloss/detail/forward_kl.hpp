#pragma once

// The forward Kullback-Leibler divergence, Hinton's soft term, as a policy of terms.hpp. For centred logits
// ds = s - max s, dt = t - max t, temperature T, q = softmax(s/T), p = softmax(t/T):
//   KL(p || q) = sum_c p_c (dt_c - ds_c) / T - log Z_t + log Z_s,   d (T^2 KL) / d s = T (q - p),
// where Z_s, Z_t are the sums of exp(ds/T), exp(dt/T). No logarithm of a probability is taken, so no epsilon
// is needed: exact zeros (from -inf logits or underflow) stay exact, and the products 0 * (-inf) that the
// formulas meet at them are masked to the mathematically right 0.

#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

struct ForwardKL {
    static constexpr bool second_pass = false;
    static constexpr bool exact_rows = true;
    static constexpr bool dense_teacher = true;

    template <class V>
    struct Sums {
        // The loss needs log Z_s - log Z_t, which is tiny when student and teacher agree; Z_s and Z_t each
        // good to float's resolution would leave it only that good. So Z_s is summed as Z_s - Z_t, term by
        // term: a sum of small differences, good to float's resolution of itself. Z_t itself only ever
        // divides (the difference, the cross term, the gradient), where its relative precision is all that
        // counts.
        V soft_difference;  // Z_s - Z_t
        V teacher_soft;     // Z_t
        V teacher_cross;    // sum_c exp(dt_c / T) (dt_c - ds_c)

        static Sums neutral() noexcept { return {0.0, 1.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.soft_difference...);
        f(sums.teacher_soft...);
        f(sums.teacher_cross...);
    }

    template <class T>
    struct Partials {
        Pack<T> difference, teacher_soft, teacher_cross;

        // The block at element i of a row, given its centred logits; stores the exponentials and returns the
        // student's, e^(ds/T).
        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Pack<T>& ds, const Pack<T>& ds_summed, const Pack<T>& dt,
                                  const LogitDifference<T>&, Exp2Scale<T> soft, const Skipped& skipped,
                                  const RowBuffers<T>& row) noexcept {
            constexpr T minus_infinity = -std::numeric_limits<T>::infinity();
            const Pack<T> e_student = fast_exp2(ds, soft);
            const Pack<T> e_teacher = fast_exp2(dt, soft);
            e_student.store(row.student_soft + i);
            e_teacher.store(row.divergence_term + i);
            const Pack<T> dt_summed = summed(dt, minus_infinity, skipped);
            const Pack<T> e_teacher_summed = summed(e_teacher, T(0), skipped);
            difference += summed(Pack<T>(e_student - e_teacher), T(0), skipped);
            teacher_soft += e_teacher_summed;
            // A teacher probability of exactly 0 contributes 0, whatever the student says there. It is 0 where
            // fast_exp2 flushed it (or the lane is skipped): the same comparison as fast_exp2's own, which the
            // compiler then makes once. (Written as a select of the whole sum, it becomes one masked FMA.)
            teacher_cross = select(dt_summed < Pack<T>(soft.lowest_x), teacher_cross,
                                   teacher_cross + e_teacher_summed * (dt_summed - ds_summed));
            return e_student;
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.soft_difference += widen(difference);
            totals.teacher_soft += widen(teacher_soft);
            totals.teacher_cross += widen(teacher_cross);
            difference = teacher_soft = teacher_cross = Pack<T>();
        }
    };

    // KL(p || q), in a problem of T. log Z_s - log Z_t = log(1 + (Z_s - Z_t) / Z_t), one logarithm instead of two,
    // and exact to the last bits of the difference however small it is where T's tolerance needs it
    // (log1p_to_tolerance). Not std::log1p: fast_log costs a few cycles, which matters for short rows, and it runs on
    // all lanes of a block at once.
    template <class T, class V>
    static KDLOSS_INLINE V divergence(const Sums<V>& sums, double temperature) noexcept {
        return sums.teacher_cross / (sums.teacher_soft * temperature) +
               log1p_to_tolerance<T>(sums.soft_difference / sums.teacher_soft);
    }

    // redo_inexact_rows' formula for this term. Its gradient q - p needs no top entry from the others
    // (top_entry.hpp): where q is nearly one-hot, q - p is not a difference of two numbers near each other unless p is
    // too, which the near matches' redo takes care of.
    static constexpr ExactKind exact_kind = ExactKind::forward_kl;
    static constexpr bool top_from_others = false;

    // The size of the two terms `divergence` is the difference of, for redo_inexact_rows (exact_row.hpp), as a
    // quotient without a division or a logarithm: |cross / (Z T)| + |log(1 + r)|, r = difference / Z, is about
    // (|cross| + T |difference|) / (Z T) (within a factor 1.5 wherever |r| < 1/2; larger |r|, which only a row
    // far from a match has, overstates it).
    template <class V>
    static KDLOSS_INLINE V terms_size_numerator(const Sums<V>& sums, double temperature) noexcept {
        return absolute(sums.teacher_cross) + temperature * absolute(sums.soft_difference);
    }
    template <class V>
    static KDLOSS_INLINE V terms_size_denominator(const Sums<V>& sums, double temperature) noexcept {
        return sums.teacher_soft * temperature;
    }

    // For redo_inexact_rows: the fraction of the terms' size below which D is computed again (the kernels' float
    // error measured at up to 4 ulps of that size, double's at up to 1/10 of 1024 ulps), and one over the largest
    // probability of the distribution whose exponentials D is summed with, 1 / max p = Z_t (no division: the four a
    // block's check took were a tenth of short rows' time).
    template <class T>
    static constexpr double redo_fraction = std::is_same_v<T, float> ? 1.0 / 16 : 1.0 / 1024;
    template <class V>
    static KDLOSS_INLINE V inverse_largest_probability(const Sums<V>& sums) noexcept {
        return sums.teacher_soft;
    }

    // The gradient's soft term: weight T (q - p) = q_scale e^(ds/T) - p_scale e^(dt/T).
    template <class T>
    struct Coefficients {
        Pack<T> q_scale, p_scale;

        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double weight, double temperature) noexcept {
            const double scale = weight * temperature;
            return {narrow<T>(scale / (sums.teacher_soft + sums.soft_difference)),
                    narrow<T>(scale / sums.teacher_soft)};
        }

        // At element i, given e^(ds/T) there. The difference, where its two terms cancel as exactly as they can
        // (to exactly 0 for a single class), comes first and the hard term after it.
        KDLOSS_INLINE Pack<T> gradient(std::size_t i, const Pack<T>& e_student,
                                       const RowBuffers<T>& row) const noexcept {
            return q_scale * e_student - p_scale * Pack<T>::load(row.divergence_term + i);
        }

        // GradientSize (terms.hpp): an entry's terms are at most q_scale and p_scale (the exponentials are at most 1).
        KDLOSS_INLINE Pack<T> terms_bound(const Pack<T>&) const noexcept { return q_scale + p_scale; }
    };
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
