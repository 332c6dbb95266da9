#pragma once

// What a loss is made of, at compile time: a soft term (a divergence between the teacher's and the student's
// tempered distributions, e.g. ForwardKL in forward_kl.hpp) and a hard term (the cross-entropy against the
// labels, cross_entropy.hpp), each a policy, or Absent. The passes of lane_math.hpp are written once over
// Terms; what a term adds to them is all in its policy:
//   - Sums<V>: the row sums its loss and gradient are computed from, by name, with
//     for_each_sum(f, sums...) over them and neutral(), sums that give harmless values (a 1 where there is a
//     division) in the lanes of a block that hold no row;
//   - Partials<T>: how the exponential pass adds a block of `lanes` elements to them (add), kept in T over a
//     chunk and added to the double Sums (flush_into), see exponentials in lane_math.hpp;
//   - the row loss from the sums; Coefficients<T>, what the gradient pass needs, from the sums; and the
//     gradient pass's term.
// V is Pack<double> while a pass adds the sums up a lane at a time, double for one long row, and Pack<double>
// again when `lanes` rows' losses are computed at once.

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// e^x = 2^(x log2(e)) (see fast_exp2).
constexpr double log2e = 1.4426950408889634074;

// |x| of a double or a Pack<double>.
template <class V>
KDLOSS_INLINE V absolute(const V& x) noexcept {
    return select(x < V(0.0), V(0.0) - x, x);
}

// The divergence D below which redo_inexact_rows (exact_row.hpp) computes a dense row of T again, whatever else.
template <class T>
constexpr double redo_below_divergence = std::is_same_v<T, float> ? 1e-3 : 1e-6;

// log(1 + r) as the KL divergences of a problem of T take it (forward_kl.hpp, reverse_kl.hpp; r the relative
// difference of Z_s and Z_t). A double row needs fast_log1p: rounding 1 + r leaves 2^-53 of 1, and such rows are kept
// down to D = redo_below_divergence = 1e-6, where that is 1e-10 of D. A float row is kept only above 1e-3, where the
// rounding is 1e-13 of D against a tolerance of 1e-5: fast_log(1 + r), without the correction's division and select
// (1.5% of a float32 call of 4096 rows of 10 classes).
template <class T, class V>
KDLOSS_INLINE V log1p_to_tolerance(const V& r) noexcept {
    if constexpr (std::is_same_v<T, float>) return fast_log(1.0 + r);
    else return fast_log1p(r);
}

// Which of exact_row's formulas (exact_row.hpp) a dense soft term's rows are computed again by.
enum class ExactKind { forward_kl, reverse_kl, mixture };

// A term a loss does not have: no sums, nothing to add.
struct Absent {
    static constexpr bool distribution = false;
    static constexpr bool second_pass = false;
    static constexpr bool exact_rows = false;
    static constexpr bool dense_teacher = false;
    static constexpr bool top_from_others = false;
    template <class V>
    struct Sums {
        static Sums neutral() noexcept { return {}; }
    };
    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&&, S&&...) noexcept {}
    template <class T>
    struct Partials {
        template <class V>
        KDLOSS_INLINE void flush_into(V&) noexcept {}
    };
    template <class T>
    struct Coefficients {};
};

// A row's buffers as the passes see them (each at the row's first element, or `lanes` rows' interleaved):
// what the exponential pass writes and the gradient pass reads back. Null where the terms have none.
template <class T>
struct RowBuffers {
    T* student_soft;                // e^(ds/T)
    T* divergence_term;             // what the divergence's gradient pass reads beside e^(ds/T): e^(dt/T), or ds - dt
    T* student_hard;                // e^(ds), when it is no power of e^(ds/T)
    const T* target;                // the target distribution
    int hard_power;                 // e^(ds) is e^(ds/T) to this power; 0: it is in student_hard (cross_entropy.hpp)
    T* logit_difference = nullptr;  // dt - ds, where keeps_logit_difference: null elsewhere
};

// dt - ds and ds - dt at an element, for the terms that keep one (reverse_kl.hpp, mixture.hpp), each from t - s and
// the maxima's difference max t - max s: without the rounding of dt and ds, each relative to itself (where the logits
// are close, t - s is exact, and all that is rounded is the maxima's difference, the same in every class). Each is
// one subtraction: ds - dt as 0 less dt - ds took a second.
template <class T>
struct LogitDifference {
    Pack<T> t_minus_s, maxima_difference;

    KDLOSS_INLINE Pack<T> teacher_less_student() const noexcept { return t_minus_s - maxima_difference; }
    KDLOSS_INLINE Pack<T> student_less_teacher() const noexcept { return maxima_difference - t_minus_s; }
};

// Whether the first pass also keeps dt - ds, for jsd's second pass (mixture.hpp). Only jsd: the others would
// pay for a stream of stores and loads they do not read (a quarter more memory per long row, measured slower).
template <class T>
bool keeps_logit_difference(const BatchProblem<T>& problem) noexcept {
    return problem.divergence == Divergence::jsd && problem.sparse == nullptr;
}

// The power of e^(ds/T) that is e^(ds), when the soft term computes e^(ds/T) at all: the temperature, if it is
// an integer from 1 to 4; else 0, and the hard term computes e^(ds) itself.
inline int hard_power(bool soft_term, double temperature) noexcept {
    const bool integer = temperature == 1.0 || temperature == 2.0 || temperature == 3.0 || temperature == 4.0;
    return soft_term && integer ? static_cast<int>(temperature) : 0;
}

// Marks a block all of whose lanes are summed (see exponentials in lane_math.hpp).
struct EveryLaneSummed {};

// `value` where a lane is summed, `instead` (what leaves a sum unchanged) where it is `skipped`: a Mask, or
// EveryLaneSummed.
template <class T, class Skipped>
KDLOSS_INLINE Pack<T> summed(const Pack<T>& value, T instead, const Skipped& skipped) noexcept {
    if constexpr (std::is_same_v<Skipped, EveryLaneSummed>) return value;
    else return select(skipped, instead, value);
}

template <class Soft, class Hard, class V>
struct TermSums {
    typename Soft::template Sums<V> soft;
    typename Hard::template Sums<V> hard;

    static TermSums neutral() noexcept {
        return {Soft::template Sums<V>::neutral(), Hard::template Sums<V>::neutral()};
    }
};

template <class Soft, class Hard, bool Gradient>
struct Terms {
    using SoftTerm = Soft;
    using HardTerm = Hard;
    static constexpr bool soft = !std::is_same_v<Soft, Absent>;
    static constexpr bool hard = !std::is_same_v<Hard, Absent>;
    static constexpr bool distribution = Hard::distribution;  // hard term against a target distribution
    static constexpr bool class_index = hard && !distribution;
    static constexpr bool gradient = Gradient;
    static constexpr bool second_pass = Soft::second_pass;
    // Rows that cancellation would spoil are computed again (exact_row.hpp); Soft says how it recognises them.
    static constexpr bool exact_rows = Soft::exact_rows;
    static constexpr bool dense_teacher = Soft::dense_teacher;  // teacher logits, not a SparseTeacherView
    // A nearly one-hot student's gradient at its top class is minus the sum of the others' (top_entry.hpp).
    static constexpr bool top_from_others = Gradient && Soft::top_from_others;
    using without_gradient = Terms<Soft, Hard, false>;
    template <class V>
    using Sums = TermSums<Soft, Hard, V>;
};

// f(a.x, b.x, ...) for each sum x of the term sums a, b, ...: what is done to every sum alike, written once.
template <class Terms, class F, class... S>
KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
    Terms::SoftTerm::for_each_sum(f, sums.soft...);
    Terms::HardTerm::for_each_sum(f, sums.hard...);
}

// A row's divergence D from its sums (V = double), or `lanes` rows' at once (V = Pack<double>), in a problem of T; 0
// without a soft term.
template <class T, class Terms, class V>
inline V soft_divergence(const typename Terms::template Sums<V>& sums, double temperature) noexcept {
    if constexpr (Terms::soft) return Terms::SoftTerm::template divergence<T>(sums.soft, temperature);
    else return V(0.0);
}

// A row's loss from its sums and its divergence (soft_divergence).
template <class Terms, class V>
inline V loss_from_sums(const typename Terms::template Sums<V>& sums, const V& divergence, double temperature,
                        double soft_weight, double hard_weight) noexcept {
    V loss = 0.0;
    if constexpr (Terms::soft) loss = loss + soft_weight * temperature * temperature * divergence;
    if constexpr (Terms::hard) loss = loss + hard_weight * Terms::HardTerm::loss(sums.hard);
    return loss;
}

// A row's soft term T^2 D and hard term CE apart, unweighted (0 for a term it does not have), from its sums and
// its divergence.
template <class Terms, class V>
inline void loss_parts_from_sums(const typename Terms::template Sums<V>& sums, const V& divergence, double temperature,
                                 V& soft, V& hard) noexcept {
    soft = hard = 0.0;
    if constexpr (Terms::soft) soft = temperature * temperature * divergence;
    if constexpr (Terms::hard) hard = Terms::HardTerm::loss(sums.hard);
}

// Each row's loss, or (problem.row_hard_losses not null) its two terms apart, from `lanes` rows' sums: rows
// rows[0 .. count). Returns their divergences D (0 without a soft term), for redo_inexact_rows.
template <class Terms, class T>
inline Pack<double> store_row_losses(const BatchProblem<T>& problem,
                                     const typename Terms::template Sums<Pack<double>>& sums, const std::size_t* rows,
                                     std::size_t count) noexcept {
    const Pack<double> divergence = soft_divergence<T, Terms>(sums, problem.temperature);
    double losses[lanes];
    if (problem.row_hard_losses == nullptr) {
        loss_from_sums<Terms>(sums, divergence, problem.temperature, problem.soft_weight, problem.hard_weight)
            .store(losses);
        for (std::size_t lane = 0; lane < count; ++lane) problem.row_losses[rows[lane]] = losses[lane];
        return divergence;
    }
    Pack<double> soft, hard;
    loss_parts_from_sums<Terms>(sums, divergence, problem.temperature, soft, hard);
    double hard_losses[lanes];
    soft.store(losses);
    hard.store(hard_losses);
    for (std::size_t lane = 0; lane < count; ++lane) {
        problem.row_losses[rows[lane]] = losses[lane];
        problem.row_hard_losses[rows[lane]] = hard_losses[lane];
    }
    return divergence;
}

// The scale of the gradient's hard term, folding in its weight and the reduction's scale. (A divergence's
// coefficients get the soft weight times the reduction's scale, and the temperature, which the derivative of
// T^2 D with respect to the logits s brings in as each divergence says.)
template <class T>
double hard_gradient_scale(const BatchProblem<T>& problem) noexcept {
    return problem.gradient_scale * problem.hard_weight;
}

// What the gradient pass needs of each term, per lane: from one row's sums (V = double: the same in every
// lane) or from a block's (V = Pack<double>: a row per lane).
template <class T, class Terms>
struct GradientCoefficients {
    typename Terms::SoftTerm::template Coefficients<T> soft;
    typename Terms::HardTerm::template Coefficients<T> hard;

    template <class V>
    static GradientCoefficients from_sums(const typename Terms::template Sums<V>& sums,
                                          const BatchProblem<T>& problem) noexcept {
        GradientCoefficients k;
        if constexpr (Terms::soft)
            k.soft = decltype(k.soft)::from_sums(sums.soft, problem.gradient_scale * problem.soft_weight,
                                                 problem.temperature);
        if constexpr (Terms::hard) k.hard = decltype(k.hard)::from_sums(sums.hard, hard_gradient_scale(problem));
        return k;
    }
};

// A divergence's gradient term of the form scale e^(ds/T) (g - mean), with g what its earlier passes stored in
// divergence_term and mean = E_q[g] (ReverseKL, Mixture): the centred difference g - mean is where the terms
// cancel, in T, as exactly as they can; where the student has no mass g may be infinite, and the term is 0.
template <class T>
struct CentredGradient {
    Pack<T> scale, mean;

    KDLOSS_INLINE Pack<T> gradient(std::size_t i, const Pack<T>& e_student, const RowBuffers<T>& row) const noexcept {
        const Pack<T> g = Pack<T>::load(row.divergence_term + i);
        return select(e_student == Pack<T>(), Pack<T>(), scale * e_student * (g - mean));
    }

    // GradientSize (below), from the entries' largest magnitude alone: an entry's terms are scale e^(ds/T) |g| and
    // scale e^(ds/T) |mean|; since e^(ds/T) <= 1 and scale e^(ds/T) g = entry + scale e^(ds/T) mean, the first is at
    // most |entry| + scale |mean| and the second at most scale |mean|.
    KDLOSS_INLINE Pack<T> terms_bound(const Pack<T>& largest) const noexcept {
        return largest + T(2) * scale * magnitude(mean);
    }
};

// What the gradient pass finds of a row's soft gradient, for redo_inexact_rows (exact_row.hpp), lane by lane (V =
// Pack<T>, a block's rows or a long row's lanes) or for a row (V = double): its largest entry, and a bound on the
// largest of what its entries' rounding is relative to, the terms each is a difference of: the soft term's
// Coefficients make it from the first (terms_bound), so that the gradient pass keeps a maximum and nothing else (two
// operations an element; one more maximum, of the terms themselves, cost ordinary calls 3-7%).
template <class V>
struct GradientSize {
    V largest, terms;
};

// The largest magnitude of x[0 .. n), lane by lane (NaN passed over; n >= lanes): GradientSize's largest entry for a
// long row whose label's entry, which a class index's y is subtracted from after the gradient pass, was the largest
// the pass saw (the row's is their max()).
template <class T>
Pack<T> largest_magnitude(const T* x, std::size_t n) noexcept {
    Pack<T> largest;
    auto update = [&](std::size_t i) KDLOSS_INLINE_LAMBDA {
        const Pack<T> entry = magnitude(Pack<T>::load(x + i));
        largest = select(entry > largest, entry, largest);
    };
    const std::size_t whole = n - n % lanes;
    for (std::size_t i = 0; i < whole; i += lanes) update(i);
    if (whole != n) update(n - lanes);  // (a window over the last block: an entry seen twice does no harm)
    return largest;
}

// Rows whose class-index label is ignore_index: no loss, a zero gradient row.
template <class T>
bool is_ignored(const BatchProblem<T>& problem, std::size_t i) noexcept {
    return problem.label_kind == LabelKind::class_indices &&
           problem.class_indices[static_cast<std::ptrdiff_t>(i) * problem.class_index_stride] == problem.ignore_index;
}

template <class T, class Terms>
void zero_ignored_row(const BatchProblem<T>& problem, std::size_t i) noexcept {
    problem.row_losses[i] = 0.0;
    if (problem.row_hard_losses != nullptr) problem.row_hard_losses[i] = 0.0;
    if constexpr (Terms::gradient) {
        T* gradient = problem.gradient + static_cast<std::ptrdiff_t>(i) * problem.gradient_stride;
        for (std::size_t c = 0; c < problem.classes; ++c) gradient[c] = T(0);
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
