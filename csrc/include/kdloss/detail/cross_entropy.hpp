#pragma once

// The hard term, the cross-entropy of softmax(s) against the labels, as a policy of terms.hpp. For a target
// distribution y (a class index is the one-hot y of its class), centred logits ds = s - max s, h = softmax(s):
//   hard = -sum_c y_c log h_c = sum(y) log Z_h - sum_c y_c ds_c,   d hard / d s = h sum(y) - y,
// where Z_h is the sum of exp(ds). Z_h is summed as its maxima's terms (ds = 0, each exactly 1) and the rest apart:
// where the student is sure of its top class, the rest is all of what both the loss and the gradient at that class
// are made of (log Z_h = log1p(rest), h - 1 = -rest / Z_h), and a sum with the 1 in it rounds the rest to T's
// resolution at 1.

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
        V maxima;        // the number of classes at the student's largest logit (ds = 0)
        V rest;          // Z_h less them: the sum of exp(ds) over the other classes
        V target_mass;   // sum_c y_c; 1 for a class index (set by at_label)
        V target_cross;  // sum_c y_c ds_c; ds at the label for a class index (set by at_label)

        static Sums neutral() noexcept { return {1.0, 0.0, 1.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.maxima...);
        f(sums.rest...);
        f(sums.target_mass...);
        f(sums.target_cross...);
    }

    // Z_h
    template <class V>
    static KDLOSS_INLINE V student_hard(const Sums<V>& sums) noexcept {
        return sums.maxima + sums.rest;
    }

    // A class index that is the student's only top class, with less than half its mass elsewhere (so that no other
    // class's e^(ds) rounds to 1): the gradient's hard term there, h_y - 1, is -rest / Z_h.
    template <class V>
    static KDLOSS_INLINE auto alone_at_top(const Sums<V>& sums) noexcept {
        // All three at once, in one comparison: ds <= 0, so that this sum of terms >= 0 is 0 only where each is.
        const V off_top = (sums.maxima - 1.0) * (sums.maxima - 1.0) - sums.target_cross;
        return off_top + select(sums.rest < V(0.5), V(0.0), V(1.0)) == V(0.0);
    }

    // A class index's sums, which the exponential pass does not add up: ds at the label.
    template <class V>
    static KDLOSS_INLINE void at_label(Sums<V>& sums, V label_logit) noexcept {
        static_assert(!Distribution);
        sums.target_mass = V(1.0);
        sums.target_cross = label_logit;
    }

    // Adds e to the rest, or 1 to the maxima where at_max.
    template <class T>
    static KDLOSS_INLINE void add_apart(const Mask<T>& at_max, const Pack<T>& e, Pack<T>& rest,
                                        Pack<T>& maxima) noexcept {
        rest = select(at_max, rest, rest + e);
        maxima = select(at_max, maxima + T(1), maxima);
    }

    template <class T>
    struct Partials {
        // Float counts the maxima apart in every row: its sum would round the rest to float's resolution at 1, which
        // is all of a confident row's cross-entropy. Double sums Z_h whole here (maxima 0, rest Z_h: counting them
        // apart cost float64 calls 5-8%), and apart only for the rows whose label may be alone at the top
        // (count_maxima_apart, below), where the rest is what the loss and the label's entry are made of.
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
            if constexpr (count_maxima) add_apart(at_max, e_hard_summed, rest, maxima);
            else rest += e_hard_summed;
            if constexpr (Distribution) {
                const Pack<T> y = summed(Pack<T>::load(row.target + i), T(0), skipped);
                target_mass += y;
                // A class the target does not want costs nothing, even at a student -inf.
                target_cross += select(y == Pack<T>(), T(0), y * ds_summed);
            }
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.maxima += widen(maxima);
            totals.rest += widen(rest);
            if constexpr (Distribution) {
                totals.target_mass += widen(target_mass);
                totals.target_cross += widen(target_cross);
            }
            rest = maxima = target_mass = target_cross = Pack<T>();
        }
    };

    // Double's maxima and rest apart, once at_label has set a class index's ds (the row's sums, V = double; or a
    // block's, lanes apart), for the rows whose label is at the top (ds 0) with Z_h < 1 + 2^-6: from the e^(ds) the
    // exponential pass left in `row` (n of them; a block's lanes x classes), a pass over those rows alone. Where the
    // rest is larger, Z_h summed whole leaves it 2^-53 Z_h / rest <= 1e-14 of itself, and the label's entry
    // h_y - 1 = -rest / Z_h (taken as h_y less 1 there) as much: far inside double's 1e-12. (The bound was 1.5 at
    // first: half the blocks of random rows of 10 classes then took this pass, 4% of a float64 call.)
    template <class T, class V>
    static void count_maxima_apart(Sums<V>& sums, const RowBuffers<T>& row, std::size_t n) noexcept {
        static_assert(std::is_same_v<T, double> && !Distribution);
        const auto wanted = select(sums.rest < V(1.0 + 0x1p-6), V(0.0), V(1.0)) - sums.target_cross == V(0.0);
        if constexpr (std::is_same_v<V, double>) {
            if (!wanted) return;
        } else {
            if (select(wanted, V(1.0), V(0.0)).sum() == 0.0) return;
        }
        auto e_hard = [&](std::size_t i) KDLOSS_INLINE_LAMBDA {  // e^(ds) at i .. i + lanes
            return hard_exponential(i, Pack<T>::load(row.student_soft + i), row);
        };
        Pack<T> rest, maxima;
        const std::size_t whole = n - n % lanes;
        for (std::size_t i = 0; i < whole; i += lanes) {
            const Pack<T> e = e_hard(i);
            add_apart(e == Pack<T>(1.0), e, rest, maxima);
        }
        if constexpr (std::is_same_v<V, double>) {
            double tail_rest = 0.0, tail_maxima = 0.0;
            for (std::size_t i = whole; i < n; ++i) {
                const double e = Powered ? soft_power(row.student_soft[i], row.hard_power) : row.student_hard[i];
                if (e == 1.0) tail_maxima += 1.0;
                else tail_rest += e;
            }
            sums.rest = rest.sum() + tail_rest;
            sums.maxima = maxima.sum() + tail_maxima;
        } else {
            sums.rest = select(wanted, rest, sums.rest);
            sums.maxima = select(wanted, maxima, sums.maxima);
        }
    }

    // e^(ds) at elements i .. i + lanes, given e^(ds/T) there.
    template <class T>
    static KDLOSS_INLINE Pack<T> hard_exponential(std::size_t i, const Pack<T>& e_student,
                                                  const RowBuffers<T>& row) noexcept {
        if constexpr (Powered) return soft_power(e_student, row.hard_power);
        else return Pack<T>::load(row.student_hard + i);
    }
    // e^(ds) at one element of each lane's row of a block (`at[lane]`, in its buffers).
    template <class T>
    static KDLOSS_INLINE Pack<T> hard_exponentials_at(const RowBuffers<T>& row, const std::size_t* at) noexcept {
        const T* source = Powered ? row.student_soft : row.student_hard;
        T gathered[lanes];
        for (std::size_t lane = 0; lane < lanes; ++lane) gathered[lane] = source[at[lane]];
        if constexpr (Powered) return soft_power(Pack<T>::load(gathered), row.hard_power);
        else return Pack<T>::load(gathered);
    }

    // log Z_h = log1p((maxima - 1) + rest)
    template <class V>
    static KDLOSS_INLINE V loss(const Sums<V>& sums) noexcept {
        const V log_student_hard = fast_log1p((sums.maxima - 1.0) + sums.rest);
        if constexpr (Distribution) return sums.target_mass * log_student_hard - sums.target_cross;
        else return log_student_hard - sums.target_cross;
    }

    // The gradient's hard term: h_scale e^(ds) - y_scale y. A class index's y is subtracted at its class (label_scale,
    // per lane: after a long row's gradient pass, in a block's, label_entries), but where the label is the student's
    // only top class (alone_at_top): there the entry is at_top, -scale rest / Z_h, where e^(ds) is 1, and label_scale
    // is 0. Taken as h_y less 1, that entry kept T's rounding of 1 (float: 6e-8 times the scale), and for a student
    // sure of its label (rest of 1e-4, say) it is the row's largest entry or near it: float32 rows missed their
    // tolerance by up to 9x.
    template <class T>
    struct Coefficients {
        Pack<T> h_scale, y_scale, at_top;
        // A bound on the hard term's entries, for GradientSize (lane_math.hpp's write_gradient): the scale times
        // sum(y) (h sum(y) and y are at most that); for a class index the scale too (h - 1 at the label, whose entry
        // is then rounded relative to it: where the soft term all but balances it, the row's largest entry is far
        // smaller; h_scale, the others', left float64 rows of such entries 1.06x their tolerance), or rest / Z_h
        // where it is alone at the top.
        Pack<T> size;
        // What a class index's gradient entry subtracts, per lane (a block's rows; a row's, in every lane). Rounded
        // once, here: computed again where it is subtracted, the compiler may fuse its product into the
        // subtraction, which rounds differently.
        T label_scale[lanes];

        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double scale) noexcept {
            const V h_scale = scale * sums.target_mass / student_hard(sums);
            Coefficients k{narrow<T>(h_scale), Pack<T>(static_cast<T>(scale)), Pack<T>(), Pack<T>(), {}};
            if constexpr (Distribution) {
                k.size = narrow<T>(scale * absolute(sums.target_mass));
                return k;
            }
            const auto alone = alone_at_top(sums);
            const V top = (0.0 - h_scale) * sums.rest;  // a class index's target_mass is 1
            k.at_top = narrow<T>(select(alone, top, h_scale));
            k.size = narrow<T>(select(alone, 0.0 - top, V(scale)));
            narrow<T>(select(alone, V(0.0), V(scale))).store(k.label_scale);
            return k;
        }

        // Adds the term at element i to g, given e^(ds/T) there.
        KDLOSS_INLINE void add_to_gradient(Pack<T>& g, std::size_t i, const Pack<T>& e_student,
                                           const RowBuffers<T>& row) const noexcept {
            const Pack<T> e_hard = hard_exponential(i, e_student, row);
            if constexpr (Distribution) g = (g + h_scale * e_hard) - y_scale * Pack<T>::load(row.target + i);
            else g += select(e_hard == Pack<T>(T(1)), at_top, h_scale * e_hard);
        }

        // A block's hard term (row_kernel.hpp's distill_block), whose lanes' label classes are known before the
        // gradient pass: h_scale e^(ds) but at each lane's label, where the whole entry is found beforehand from
        // e^(ds) there (`e_at_labels`), at_top where the label is alone at the top, else h_scale e^(ds) less
        // label_scale. One selection an element, by the label, where the rows' pass had two (at the top, at the label).
        KDLOSS_INLINE Pack<T> label_entries(const Pack<T>& e_at_labels) const noexcept {
            return select(labels_alone_at_top(), at_top, h_scale * e_at_labels - Pack<T>::load(label_scale));
        }
        // Where each lane's class index is alone at its student's top (alone_at_top), which from_sums marks with a
        // label_scale of 0; a long row's, whose sums are in every lane, is lane 0's.
        KDLOSS_INLINE Mask<T> labels_alone_at_top() const noexcept { return Pack<T>::load(label_scale) == Pack<T>(); }
        KDLOSS_INLINE bool row_label_alone_at_top() const noexcept { return label_scale[0] == T(0); }
        KDLOSS_INLINE Pack<T> off_labels(std::size_t i, const Pack<T>& e_student,
                                         const RowBuffers<T>& row) const noexcept {
            return h_scale * hard_exponential(i, e_student, row);
        }
    };
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
