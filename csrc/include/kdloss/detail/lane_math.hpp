#pragma once

// The distillation loss and its gradient, written once over "lanes" so that two drivers can share it
// (row_kernel.hpp): a long row is spread over the lanes (lane = class % lanes) and the lanes' partial sums are
// added at the end; a block of short rows is transposed so that each lane is one row, and no lane ever
// meets another.
//
// For student logits s, teacher logits t, temperature T, q = softmax(s/T), p = softmax(t/T), h = softmax(s),
// and centred logits ds = s - max s, dt = t - max t:
//   soft = T^2 KL(p || q) = T^2 [ sum_c p_c (dt_c - ds_c) / T  - log Z_t + log Z_s ]
//   hard = -sum_c y_c log h_c = sum(y) log Z_h - sum_c y_c ds_c
//   d soft / d s = T (q - p),   d hard / d s = h sum(y) - y
// where Z_s, Z_t, Z_h are the sums of exp(ds/T), exp(dt/T), exp(ds). No logarithm of a probability is
// taken, so no epsilon is needed: exact zeros (from -inf logits or underflow) stay exact, and the products
// 0 * (-inf) that the formulas meet at them are masked to the mathematically right 0.
//
// Everything is computed a Pack (pack.hpp) of `lanes` values at a time, without branches, and every sum is
// kept per lane, so no floating-point sum is ever reassociated and results do not depend on the vector width.
// Which terms exist is fixed at compile time (Terms).

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <bool Soft, bool Hard, bool Distribution, bool Gradient>
struct Terms {
    static constexpr bool soft = Soft;
    static constexpr bool hard = Hard;
    static constexpr bool distribution = Distribution;  // hard term against a target distribution
    static constexpr bool gradient = Gradient;
    using without_gradient = Terms<Soft, Hard, Distribution, false>;
};

// Rows of up to this many bytes (in each input) are fetched into cache ahead of their turn (RowsAhead). A longer
// row is not, and its scratch does not fit in L2 beside it: the passes before a forward one run backwards
// (for_each_block), so that the forward pass starts on what they touched last, which is still in cache.
constexpr std::size_t long_row_bytes = 262144;

// step(i) for each block of `lanes` elements of a row of n >= lanes: i = 0, lanes, 2 lanes, ..., and, when n
// is no multiple of lanes, n - lanes, the window of the last `lanes` elements, which overlaps the block
// before. Forwards, or backwards (the last block first) when `backwards`.
template <class Step>
KDLOSS_INLINE void for_each_block(std::size_t n, bool backwards, Step&& step) noexcept {
    const std::size_t whole = n - n % lanes;
    if (backwards) {
        if (whole != n) step(n - lanes);
        for (std::size_t i = whole; i >= lanes;) {
            i -= lanes;
            step(i);
        }
    } else {
        for (std::size_t i = 0; i < whole; i += lanes) step(i);
        if (whole != n) step(n - lanes);
    }
}

// Per-lane maxima of n >= lanes elements. A last partial block is read as the window of the last `lanes`
// elements, which overlaps the block before: a maximum does not mind seeing an element twice. They start
// at -inf, so an all -inf row yields -inf and then NaN: it has no softmax.
template <class T>
struct LaneMaxima {
    Pack<T> student, teacher;
};

// The maxima's scan a block at a time, for a pass that finds a row's maxima on the way (exponentials).
template <class T, bool WithTeacher>
struct LaneMaximaScan {
    const T* student;
    const T* teacher;
    LaneMaxima<T> maxima{Pack<T>(-std::numeric_limits<T>::infinity()), Pack<T>(-std::numeric_limits<T>::infinity())};

    // The block of `lanes` elements from i.
    KDLOSS_INLINE void update(std::size_t i) noexcept {
        const Pack<T> s = Pack<T>::load(student + i);
        maxima.student = select(s > maxima.student, s, maxima.student);
        if constexpr (WithTeacher) {
            const Pack<T> t = Pack<T>::load(teacher + i);
            maxima.teacher = select(t > maxima.teacher, t, maxima.teacher);
        }
    }
};

// The maxima in a pass of their own (backwards for a long row: the exponential pass comes next).
template <class T, bool WithTeacher>
LaneMaxima<T> lane_maxima(const T* student, const T* teacher, std::size_t n) noexcept {
    LaneMaximaScan<T, WithTeacher> scan{student, teacher};
    for_each_block(n, n * sizeof(T) > long_row_bytes, [&](std::size_t i) KDLOSS_INLINE_LAMBDA { scan.update(i); });
    return scan.maxima;
}

// The sums a row's loss and gradient are computed from, by name. V is Pack<double> while a pass adds them up
// a lane at a time (LaneSums), double for one long row (RowSums, row_kernel.hpp), and Pack<double> again when
// `lanes` rows' losses are computed at once (a block's, or RowLosses in run_rows.hpp).
template <class V>
struct Sums {
    V soft_difference;  // Z_s - Z_t
    V teacher_soft;     // Z_t
    V teacher_cross;    // sum_c exp(dt_c / T) (dt_c - ds_c)
    V student_hard;     // Z_h
    V target_mass;      // sum_c y_c
    V target_cross;     // sum_c y_c ds_c
};

// f(a.x, b.x, ...) for each sum x of the Sums a, b, ...: what is done to every sum alike, written once.
template <class F, class... S>
KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
    f(sums.soft_difference...);
    f(sums.teacher_soft...);
    f(sums.teacher_cross...);
    f(sums.student_hard...);
    f(sums.target_mass...);
    f(sums.target_cross...);
}

// Per-lane sums of the exponential pass, in double.
using LaneSums = Sums<Pack<double>>;

// The exponentials e^(ds/T) = 2^(ds log2(e) / T) (see fast_exp2).
constexpr double log2e = 1.4426950408889634074;
template <class T>
Exp2Scale<T> soft_exponent(double temperature) noexcept {
    return exp2_scale<T>(log2e / temperature);
}

// e^(ds) for the hard term, where the temperature T is an integer <= 4: (e^(ds/T))^T, a multiply or two where
// an exponential costs twenty operations. HardPower is that T (0 when there is none: e^(ds) is then an
// exponential of its own).
template <int HardPower, class V>
KDLOSS_INLINE V soft_power(V soft_exponential) noexcept {
    static_assert(HardPower >= 1 && HardPower <= 4);
    const V e = soft_exponential;
    if constexpr (HardPower == 1) return e;
    if constexpr (HardPower == 2) return e * e;
    if constexpr (HardPower == 3) return e * e * e;
    if constexpr (HardPower == 4) return (e * e) * (e * e);
}

// A row's logits; null: no such row.
template <class T>
struct RowLogits {
    const T* student = nullptr;
    const T* teacher = nullptr;
};

// The rows after a long row, which its passes touch on the way, a block at a time: the next one is scanned
// for its maxima, so that its own first pass costs no pass over memory of its own, and one (rows of up to
// long_row_bytes) is fetched into cache by the exponential pass, so that the scan then finds it there.
//
// Where the target has registers enough (AVX-512: 32, and a float Pack in one), the exponential pass
// scans the next row and fetches the one after: it is bound by arithmetic, so the loads cost it little,
// where the gradient pass is bound by memory. Elsewhere a Pack is two to four registers, the exponential
// pass already spills, and the scan made it slower: the gradient pass scans the next row, which the
// exponential pass fetched; without the fetch the scan would wait on memory in batches larger than L3.
// (benchmarks/README.md, "Kernel design decisions", has the measurements.)
inline constexpr bool scan_in_exponentials = parts<float> == 1;
template <class T>
struct RowsAhead {
    RowLogits<T> next;              // scanned for its maxima
    RowLogits<T> fetched;           // the next row, or the one after it (scan_in_exponentials)
    T* fetched_gradient = nullptr;  // the fetched row's gradient, fetched to be written (see fetch_gradient)
};

// Whether the exponential pass also fetches the gradient's row ahead, whose first stores would otherwise
// each wait on memory: for calls that move more than about an L3 (three arrays of rows, here 32 MiB), in rows
// of 8000 bytes or more that are fetched at all (up to long_row_bytes): it pays beyond L3 and costs in cache
// and in shorter rows (benchmarks/README.md, "Kernel design decisions").
template <class T>
bool fetch_gradient(std::size_t rows, std::size_t classes) noexcept {
    constexpr std::size_t min_row_bytes = 8000, cache_bytes = std::size_t{32} << 20;
    const std::size_t row_bytes = classes * sizeof(T);
    return row_bytes >= min_row_bytes && row_bytes <= long_row_bytes && rows > cache_bytes / (3 * row_bytes);
}

// Marks a block all of whose lanes are summed (see exponentials).
struct EveryLaneSummed {};

// Writes the exponentials of n >= lanes elements (soft: soft_exponent(T)) to scratch and adds their per-lane
// sums to `sums`; returns the lane maxima of `ahead.next` if scan_in_exponentials (-inf where there is none).
// Loss-only and loss-and-gradient calls run this very function (callers pass Terms::without_gradient, and
// it is never inlined into them), so both return bitwise the same loss.
//
// A last partial block is computed as the window of the last `lanes` elements, which overlaps the block
// before: its overlapping lanes store the same exponentials again, and are left out of the sums as if their
// logits were -inf. Rows of any length then run as whole vectors, without a padded copy.
//
// Sums are kept in T over chunks of 64 terms a lane, while they are exact to a few ulps, and added to double
// totals after each chunk (flushing more often costs time and gains no exactness). Two things keep
// float sums exact where it matters:
//   - The cross-entropy needs log Z_h, where Z_h is 1 (the maximum's term, ds = 0) plus the rest, and a
//     float sum would round that rest to float's resolution at 1, which is all of a confident row's
//     cross-entropy; so in float the maxima's terms are counted apart, exactly, and only the rest is summed.
//   - The soft loss needs log Z_s - log Z_t, which is tiny when student and teacher agree; Z_s and Z_t each
//     good to float's resolution would leave it only that good. So Z_s is summed as Z_s - Z_t, term by
//     term: a sum of small differences, good to float's resolution of itself. Z_t itself only ever divides
//     (the difference, the cross term, the gradient), where its relative precision is all that counts.
template <class T, class Terms, int HardPower>
KDLOSS_NOINLINE LaneMaxima<T> exponentials(const T* student, const T* teacher, const T* target, Pack<T> student_max,
                                           Pack<T> teacher_max, Exp2Scale<T> soft, T* student_soft, T* teacher_soft,
                                           T* student_hard, std::size_t n, RowsAhead<T> ahead,
                                           LaneSums& sums) noexcept {
    constexpr bool count_maxima = std::is_same_v<T, float> && Terms::hard;        // for Z_h only
    constexpr std::size_t chunk = lanes * (std::is_same_v<T, float> ? 64 : 256);  // 64 float terms a lane
    constexpr T minus_infinity = -std::numeric_limits<T>::infinity();
    const Exp2Scale<T> natural = exp2_scale<T>(log2e);  // e^(ds), when it is no power of a soft exponential
    LaneSums totals{};
    Pack<T> difference, z_teacher_part, rest_hard, maxima_student;
    Pack<T> teacher_cross, target_mass, target_cross;
    LaneMaximaScan<T, Terms::soft> scan{ahead.next.student, ahead.next.teacher};

    // The block of `lanes` elements from i; `skipped` (a Mask, or EveryLaneSummed) marks lanes left out of
    // the sums.
    auto block = [&](std::size_t i, auto skipped) KDLOSS_INLINE_LAMBDA {
        constexpr bool every_lane = std::is_same_v<decltype(skipped), EveryLaneSummed>;
        auto summed = [&](const Pack<T>& value, T instead) KDLOSS_INLINE_LAMBDA {
            if constexpr (every_lane) return value;
            else return select(skipped, instead, value);
        };
        if constexpr (scan_in_exponentials)
            if (ahead.next.student != nullptr) scan.update(i);
        if (ahead.fetched.student != nullptr) {
            constexpr std::size_t line = 64 / sizeof(T);  // elements in a cache line
            for (std::size_t j = 0; j < lanes; j += line) {
                KDLOSS_PREFETCH(ahead.fetched.student + i + j);
                KDLOSS_PREFETCH(ahead.fetched.teacher + i + j);
                if (ahead.fetched_gradient != nullptr) KDLOSS_PREFETCH_TO_WRITE(ahead.fetched_gradient + i + j);
            }
        }
        const Pack<T> ds = Pack<T>::load(student + i) - student_max;
        const Pack<T> ds_summed = summed(ds, minus_infinity);
        const Mask<T> student_at_max = ds_summed == Pack<T>();
        Pack<T> e_student;
        if constexpr (Terms::soft) {
            const Pack<T> dt = Pack<T>::load(teacher + i) - teacher_max;
            e_student = fast_exp2(ds, soft);
            const Pack<T> e_teacher = fast_exp2(dt, soft);
            e_student.store(student_soft + i);
            e_teacher.store(teacher_soft + i);
            const Pack<T> dt_summed = summed(dt, minus_infinity);
            const Pack<T> e_teacher_summed = summed(e_teacher, T(0));
            difference += summed(e_student - e_teacher, T(0));
            z_teacher_part += e_teacher_summed;
            // A teacher probability of exactly 0 contributes 0, whatever the student says there. It is 0 where
            // fast_exp2 flushed it (or the lane is skipped): the same comparison as fast_exp2's own, which the
            // compiler then makes once. (Written as a select of the whole sum, it becomes one masked FMA.)
            teacher_cross = select(dt_summed < Pack<T>(soft.lowest_x), teacher_cross,
                                   teacher_cross + e_teacher_summed * (dt_summed - ds_summed));
        }
        if constexpr (Terms::hard) {
            Pack<T> e_hard;
            if constexpr (HardPower == 0) e_hard = fast_exp2(ds, natural);
            else e_hard = soft_power<HardPower>(e_student);
            // A power of the soft exponential is cheaper to recompute in the gradient pass than to store.
            if constexpr (HardPower == 0) e_hard.store(student_hard + i);
            const Pack<T> e_hard_summed = summed(e_hard, T(0));
            if constexpr (count_maxima) rest_hard = select(student_at_max, rest_hard, rest_hard + e_hard_summed);
            else rest_hard += e_hard_summed;
        }
        if constexpr (count_maxima) maxima_student = select(student_at_max, maxima_student + T(1), maxima_student);
        if constexpr (Terms::distribution) {
            const Pack<T> y = summed(Pack<T>::load(target + i), T(0));
            target_mass += y;
            // A class the target does not want costs nothing, even at a student -inf.
            target_cross += select(y == Pack<T>(), T(0), y * ds_summed);
        }
    };

    const std::size_t whole = n - n % lanes;
    for (std::size_t begin = 0; begin < whole; begin += chunk) {
        const std::size_t end = whole - begin < chunk ? whole : begin + chunk;
        for (std::size_t i = begin; i < end; i += lanes) block(i, EveryLaneSummed{});
        if (end == whole && whole != n) {
            // The window's first lanes - (n - whole) lanes overlap the block before.
            T lane_index[lanes];
            for (std::size_t lane = 0; lane < lanes; ++lane) lane_index[lane] = static_cast<T>(lane);
            block(n - lanes, Pack<T>::load(lane_index) < Pack<T>(static_cast<T>(lanes - (n - whole))));
        }
        totals.soft_difference += widen(difference);
        totals.teacher_soft += widen(z_teacher_part);
        totals.student_hard += widen(maxima_student) + widen(rest_hard);
        totals.teacher_cross += widen(teacher_cross);
        totals.target_mass += widen(target_mass);
        totals.target_cross += widen(target_cross);
        difference = z_teacher_part = rest_hard = maxima_student = Pack<T>();
        teacher_cross = target_mass = target_cross = Pack<T>();
    }
    for_each_sum([](Pack<double>& sum, const Pack<double>& total) KDLOSS_INLINE_LAMBDA { sum += total; }, sums, totals);
    return scan.maxima;
}

// A row's loss from its sums (V = double), or 16 rows' at once (V = Pack<double>). `target_logit` is ds at
// the label for class-index labels. fast_log, not std::log: it costs a few cycles, which matters for short
// rows, and it runs on all lanes of a block at once.
template <class Terms, class V>
inline V loss_from_sums(const Sums<V>& sums, V target_logit, double temperature, double soft_weight,
                        double hard_weight) noexcept {
    V loss = 0.0;
    if constexpr (Terms::soft) {
        // log Z_s - log Z_t = log(1 + (Z_s - Z_t) / Z_t), one logarithm instead of two, and exact to the
        // last bits of the difference however small it is.
        const V kl = sums.teacher_cross / (sums.teacher_soft * temperature) +
                     fast_log(1.0 + sums.soft_difference / sums.teacher_soft);
        loss = loss + soft_weight * temperature * temperature * kl;
    }
    if constexpr (Terms::hard) {
        V hard;
        if constexpr (Terms::distribution) hard = sums.target_mass * fast_log(sums.student_hard) - sums.target_cross;
        else hard = fast_log(sums.student_hard) - target_logit;
        loss = loss + hard_weight * hard;
    }
    return loss;
}

// The scale of the gradient's hard term (and of a class-index label's -y), and of its soft term.
template <class T>
double hard_gradient_scale(const BatchProblem<T>& problem) noexcept {
    return problem.gradient_scale * problem.hard_weight;
}
template <class T>
double soft_gradient_scale(const BatchProblem<T>& problem) noexcept {
    return problem.gradient_scale * problem.soft_weight * problem.temperature;
}

// Gradient coefficients per lane: gradient = soft_q q - soft_p p + hard_h h - hard_y y, folding in the
// normalising sums, the weights and the reduction's scale. From one row's sums (V = double: the same in
// every lane) or from a block's (V = Pack<double>: a row per lane).
template <class T>
struct GradientCoefficients {
    Pack<T> soft_q, soft_p, hard_h, hard_y;
    // hard_y's value, which a class-index label's gradient entry subtracts. Rounded once, here: computed again
    // where it is subtracted, the compiler may fuse its product into the subtraction, which rounds differently.
    T label_scale;

    // From the sums by name. Class-index labels have a target mass of 1, which their sums do not hold.
    template <class Terms, class V>
    static GradientCoefficients from_sums(const Sums<V>& sums, const BatchProblem<T>& problem) noexcept {
        return GradientCoefficients(sums.teacher_soft + sums.soft_difference, sums.teacher_soft, sums.student_hard,
                                    Terms::distribution ? sums.target_mass : V(1.0), soft_gradient_scale(problem),
                                    hard_gradient_scale(problem));
    }

    template <class V>
    GradientCoefficients(V student_soft, V teacher_soft, V student_hard, V target_mass, double soft_scale,
                         double hard_scale) noexcept
        : soft_q(narrow<T>(soft_scale / student_soft)),
          soft_p(narrow<T>(soft_scale / teacher_soft)),
          hard_h(narrow<T>(hard_scale * target_mass / student_hard)),
          hard_y(static_cast<T>(hard_scale)),
          label_scale(static_cast<T>(hard_scale)) {}
};

// gradient[i] for i < n, n >= lanes. A last partial block is computed as the window of the last `lanes`
// elements: its lanes that overlap the block before compute and store the same values again.
// `student_soft` may be `gradient` itself (distill_row keeps the student's exponentials there): each
// block reads its exponentials before it stores over them, and the last window, which reads some of the
// block before's, is computed first and stored last.
// Given the next row of as many classes (`next`, not null; see RowsAhead), it also returns that row's lane
// maxima, found in the same loop.
template <class T, class Terms, int HardPower>
KDLOSS_NOINLINE LaneMaxima<T> write_gradient(T* gradient, const T* student_soft, const T* teacher_soft,
                                             const T* student_hard, const T* target,
                                             const GradientCoefficients<T>& coefficients, std::size_t n,
                                             RowLogits<T> next) noexcept {
    const GradientCoefficients<T> k = coefficients;  // a local copy, which the stores below cannot alias
    auto at = [&](std::size_t i) KDLOSS_INLINE_LAMBDA {
        Pack<T> g;
        const Pack<T> q = Pack<T>::load(student_soft + i);
        // The soft difference first, where its two terms cancel as exactly as they can (to exactly 0 for a
        // single class), and the hard term after: q (soft_q + hard_h q^(T-1)) saves a multiply but is not 0
        // there.
        if constexpr (Terms::soft) g = k.soft_q * q - k.soft_p * Pack<T>::load(teacher_soft + i);
        if constexpr (Terms::hard && HardPower == 0) g += k.hard_h * Pack<T>::load(student_hard + i);
        if constexpr (Terms::hard && HardPower != 0) g += k.hard_h * soft_power<HardPower>(q);
        if constexpr (Terms::distribution) g = g - k.hard_y * Pack<T>::load(target + i);
        return g;
    };
    const std::size_t whole = n - n % lanes;
    Pack<T> last;
    if (whole != n) last = at(n - lanes);
    // Backwards for a long row: from the exponentials written last, and the next row's exponential pass
    // comes next, into the scratch touched last.
    const bool backwards = n * sizeof(T) > long_row_bytes;
    LaneMaximaScan<T, Terms::soft> scan{next.student, next.teacher};
    if (next.student == nullptr) {
        for_each_block(whole, backwards, [&](std::size_t i) KDLOSS_INLINE_LAMBDA { at(i).store(gradient + i); });
    } else {
        for_each_block(whole, backwards, [&](std::size_t i) KDLOSS_INLINE_LAMBDA {
            at(i).store(gradient + i);
            scan.update(i);
        });
        if (whole != n) scan.update(n - lanes);
    }
    if (whole != n) last.store(gradient + n - lanes);
    return scan.maxima;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
