#pragma once

// The hard term, the cross-entropy of softmax(s) against the labels, as a policy of terms.hpp. For a target
// distribution y (a class index is the one-hot y of its class), centred logits ds = s - max s, h = softmax(s):
//   hard = -sum_c y_c log h_c = sum(y) log Z_h - sum_c y_c ds_c,   d hard / d s = h sum(y) - y,
// where Z_h is the sum of exp(ds).

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// e^(ds) where the temperature T is an integer <= 4: (e^(ds/T))^T, a multiply or two where an exponential
// costs twenty operations. `power` is a run-time value (RowBuffers::hard_power): a branch on it, the same in
// every block, costs next to nothing, where a kernel for each power would be compiled four times over. (Whether
// e^(ds) is a power at all is a template argument: as a run-time branch it cost 2-4% of forward KL's time.)
template <class V>
KDLOSS_INLINE V soft_power(V e, int power) noexcept {
    if (power == 1) return e;
    if (power == 2) return e * e;
    if (power == 3) return e * e * e;
    return (e * e) * (e * e);
}

// Distribution: against target distributions, else class indices. Powered: e^(ds) is a power of the soft term's
// e^(ds/T) (RowBuffers::hard_power, see soft_power), else an exponential of its own.
template <bool Distribution, bool Powered>
struct CrossEntropy {
    static constexpr bool distribution = Distribution;

    template <class V>
    struct Sums {
        V student_hard;  // Z_h
        V target_mass;   // sum_c y_c; 1 for a class index (set by at_label)
        V target_cross;  // sum_c y_c ds_c; ds at the label for a class index (set by at_label)

        static Sums neutral() noexcept { return {1.0, 1.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.student_hard...);
        f(sums.target_mass...);
        f(sums.target_cross...);
    }

    // A class index's sums, which the exponential pass does not add up: ds at the label.
    template <class V>
    static KDLOSS_INLINE void at_label(Sums<V>& sums, V label_logit) noexcept {
        static_assert(!Distribution);
        sums.target_mass = V(1.0);
        sums.target_cross = label_logit;
    }

    template <class T>
    struct Partials {
        // The cross-entropy needs log Z_h, where Z_h is 1 (the maximum's term, ds = 0) plus the rest, and a
        // float sum would round that rest to float's resolution at 1, which is all of a confident row's
        // cross-entropy; so in float the maxima's terms are counted apart, exactly, and only the rest is summed.
        static constexpr bool count_maxima = std::is_same_v<T, float>;
        Pack<T> rest, maxima, target_mass, target_cross;
        const Exp2Scale<T> natural = exp2_scale<T>(log2e);  // e^(ds), when it is no power of e^(ds/T)

        // The block at element i of a row, given its centred logits and (row.hard_power) e^(ds/T).
        template <class Skipped>
        KDLOSS_INLINE void add(std::size_t i, const Pack<T>& ds, const Pack<T>& ds_summed, const Pack<T>& e_student,
                               const Skipped& skipped, const RowBuffers<T>& row) noexcept {
            const Mask<T> at_max = ds_summed == Pack<T>();
            Pack<T> e_hard;
            if constexpr (!Powered) {
                e_hard = fast_exp2(ds, natural);
                e_hard.store(row.student_hard + i);
            } else {
                // A power of the soft exponential is cheaper to recompute in the gradient pass than to store.
                e_hard = soft_power(e_student, row.hard_power);
            }
            const Pack<T> e_hard_summed = summed(e_hard, T(0), skipped);
            if constexpr (count_maxima) rest = select(at_max, rest, rest + e_hard_summed);
            else rest += e_hard_summed;
            if constexpr (count_maxima) maxima = select(at_max, maxima + T(1), maxima);
            if constexpr (Distribution) {
                const Pack<T> y = summed(Pack<T>::load(row.target + i), T(0), skipped);
                target_mass += y;
                // A class the target does not want costs nothing, even at a student -inf.
                target_cross += select(y == Pack<T>(), T(0), y * ds_summed);
            }
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.student_hard += widen(maxima) + widen(rest);
            if constexpr (Distribution) {
                totals.target_mass += widen(target_mass);
                totals.target_cross += widen(target_cross);
            }
            rest = maxima = target_mass = target_cross = Pack<T>();
        }
    };

    template <class V>
    static KDLOSS_INLINE V loss(const Sums<V>& sums) noexcept {
        if constexpr (Distribution) return sums.target_mass * fast_log(sums.student_hard) - sums.target_cross;
        else return fast_log(sums.student_hard) - sums.target_cross;
    }

    // The gradient's hard term: h_scale e^(ds) - y_scale y.
    template <class T>
    struct Coefficients {
        Pack<T> h_scale, y_scale;
        // y_scale's value, which a class index's gradient entry subtracts. Rounded once, here: computed again
        // where it is subtracted, the compiler may fuse its product into the subtraction, which rounds
        // differently.
        T label_scale;

        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double scale) noexcept {
            return {narrow<T>(scale * sums.target_mass / sums.student_hard), Pack<T>(static_cast<T>(scale)),
                    static_cast<T>(scale)};
        }

        // Adds the term at element i to g, given e^(ds/T) there.
        KDLOSS_INLINE void add_to_gradient(Pack<T>& g, std::size_t i, const Pack<T>& e_student,
                                           const RowBuffers<T>& row) const noexcept {
            if constexpr (!Powered) g += h_scale * Pack<T>::load(row.student_hard + i);
            else g += h_scale * soft_power(e_student, row.hard_power);
            if constexpr (Distribution) g = g - y_scale * Pack<T>::load(row.target + i);
        }
    };
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
