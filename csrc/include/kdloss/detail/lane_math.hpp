#pragma once

// The passes over a row that compute a loss and its gradient, written once over "lanes" so that two drivers
// can share them (row_kernel.hpp): a long row is spread over the lanes (lane = class % lanes) and the lanes'
// partial sums are added at the end; a block of short rows is transposed so that each lane is one row, and no
// lane ever meets another. What each term computes on the way is its policy's (terms.hpp); which terms exist
// is fixed at compile time (Terms).
//
// Everything is computed a Pack (pack.hpp) of `lanes` values at a time, without branches, and every sum is
// kept per lane, so no floating-point sum is ever reassociated and results do not depend on the vector width.

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

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

// The exponentials e^(ds/T) = 2^(ds log2(e) / T) (see fast_exp2).
template <class T>
Exp2Scale<T> soft_exponent(double temperature) noexcept {
    return exp2_scale<T>(log2e / temperature);
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

// Writes the exponentials of n >= lanes elements (soft: soft_exponent(T)) to `row`'s buffers and adds their
// per-lane sums to `sums`; returns the lane maxima of `ahead.next` if scan_in_exponentials (-inf where there is
// none). Loss-only and loss-and-gradient calls run this very function (callers pass Terms::without_gradient,
// and it is never inlined into them), so both return bitwise the same loss.
//
// A last partial block is computed as the window of the last `lanes` elements, which overlaps the block
// before: its overlapping lanes store the same exponentials again, and are left out of the sums as if their
// logits were -inf. Rows of any length then run as whole vectors, without a padded copy.
//
// The terms keep their sums in T over chunks of 64 terms a lane (Partials), while they are exact to a few
// ulps, and add them to double totals after each chunk (flushing more often costs time and gains no
// exactness).
template <class T, class Terms>
KDLOSS_NOINLINE LaneMaxima<T> exponentials(const T* student, const T* teacher, Pack<T> student_max, Pack<T> teacher_max,
                                           Exp2Scale<T> soft, const RowBuffers<T>& row, std::size_t n,
                                           RowsAhead<T> ahead,
                                           typename Terms::template Sums<Pack<double>>& sums) noexcept {
    constexpr std::size_t chunk = lanes * (std::is_same_v<T, float> ? 64 : 256);  // 64 float terms a lane
    constexpr T minus_infinity = -std::numeric_limits<T>::infinity();
    typename Terms::template Sums<Pack<double>> totals{};
    typename Terms::SoftTerm::template Partials<T> soft_partials;
    typename Terms::HardTerm::template Partials<T> hard_partials;
    LaneMaximaScan<T, Terms::dense_teacher> scan{ahead.next.student, ahead.next.teacher};
    const Pack<T> maxima_difference = teacher_max - student_max;

    // The block of `lanes` elements from i; `skipped` (a Mask, or EveryLaneSummed) marks lanes left out of
    // the sums.
    auto block = [&](std::size_t i, const auto& skipped) KDLOSS_INLINE_LAMBDA {
        if constexpr (scan_in_exponentials)
            if (ahead.next.student != nullptr) scan.update(i);
        if (ahead.fetched.student != nullptr) {
            constexpr std::size_t line = 64 / sizeof(T);  // elements in a cache line
            for (std::size_t j = 0; j < lanes; j += line) {
                KDLOSS_PREFETCH(ahead.fetched.student + i + j);
                if constexpr (Terms::dense_teacher) KDLOSS_PREFETCH(ahead.fetched.teacher + i + j);
                if (ahead.fetched_gradient != nullptr) KDLOSS_PREFETCH_TO_WRITE(ahead.fetched_gradient + i + j);
            }
        }
        const Pack<T> s = Pack<T>::load(student + i);
        const Pack<T> ds = s - student_max;
        const Pack<T> ds_summed = summed(ds, minus_infinity, skipped);
        Pack<T> e_student;
        if constexpr (Terms::soft) {
            Pack<T> dt;
            LogitDifference<T> difference{Pack<T>(), maxima_difference};
            if constexpr (Terms::dense_teacher) {
                const Pack<T> t = Pack<T>::load(teacher + i);
                dt = t - teacher_max;
                difference.t_minus_s = t - s;
            }
            e_student = soft_partials.add(i, ds, ds_summed, dt, difference, soft, skipped, row);
        }
        if constexpr (Terms::hard) hard_partials.add(i, ds, ds_summed, e_student, skipped, row);
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
        soft_partials.flush_into(totals.soft);
        hard_partials.flush_into(totals.hard);
    }
    for_each_sum<Terms>([](Pack<double>& sum, const Pack<double>& total) KDLOSS_INLINE_LAMBDA { sum += total; }, sums,
                        totals);
    return scan.maxima;
}

// The second pass, n >= lanes, of a divergence that needs its row sums first (Soft::second_pass, mixture.hpp),
// over the exponentials the first pass stored: adds its sums to `sums`, kept in T over chunks as in exponentials, and
// with the gradient stores what the policy returns over row.divergence_term. A last partial block is the
// window of the last `lanes` elements, its overlapping lanes left out of the sums; since it reads what the
// block before writes over, it is computed first and stored last.
// A pass with Pass::staged values per element runs in two loops over each span of staged_span elements: stage,
// which stores them (the skews' quotients) in a buffer on the stack, then add, which reads them. In one loop the
// work of both held more values than AVX2's sixteen registers, and ran 7-9% slower (float32 at 256x1000 and
// 8x128256; 6% float64).
template <class T, class Soft, bool Gradient, class Pass>
KDLOSS_NOINLINE void second_pass(const RowBuffers<T>& row, std::size_t n, Pass pass,
                                 typename Soft::template Sums<Pack<double>>& sums) noexcept {
    constexpr std::size_t chunk = lanes * (std::is_same_v<T, float> ? 64 : 256);
    constexpr std::size_t staged_span = lanes * 64;  // staged float32 values fill 8 KiB, float64 16 KiB
    alignas(64) T staged[Pass::staged == 0 ? lanes : Pass::staged * staged_span];
    const std::size_t whole = n - n % lanes;
    Pack<T> last;
    if (whole != n) {
        T lane_index[lanes];
        for (std::size_t lane = 0; lane < lanes; ++lane) lane_index[lane] = static_cast<T>(lane);
        if constexpr (Pass::staged != 0) pass.stage(n - lanes, row, staged);
        last =
            pass.add(n - lanes, Pack<T>::load(lane_index) < Pack<T>(static_cast<T>(lanes - (n - whole))), row, staged);
    }
    for (std::size_t begin = 0; begin < whole; begin += chunk) {
        const std::size_t end = whole - begin < chunk ? whole : begin + chunk;
        for (std::size_t span = begin; span < end; span += staged_span) {
            const std::size_t span_end = end - span < staged_span ? end : span + staged_span;
            if constexpr (Pass::staged != 0)
                for (std::size_t i = span; i < span_end; i += lanes)
                    pass.stage(i, row, staged + Pass::staged * (i - span));
            for (std::size_t i = span; i < span_end; i += lanes) {
                const Pack<T> stored = pass.add(i, EveryLaneSummed{}, row, staged + Pass::staged * (i - span));
                if constexpr (Gradient) stored.store(row.divergence_term + i);
            }
        }
        pass.flush_into(sums);
    }
    if constexpr (Gradient)
        if (whole != n) last.store(row.divergence_term + n - lanes);
}

// A block's class-index labels, for its gradient pass (write_gradient): each lane's class, as T, and the whole hard
// entry there (CrossEntropy's label_entries).
template <class T>
struct BlockLabels {
    T classes[lanes];
    Pack<T> entries;
};

// gradient[i] for i < n, n >= lanes. A last partial block is computed as the window of the last `lanes`
// elements: its lanes that overlap the block before compute and store the same values again.
// `row.student_soft` may be `gradient` itself (distill_row keeps the student's exponentials there): each
// block reads its exponentials before it stores over them, and the last window, which reads some of the
// block before's, is computed first and stored last.
// Given the next row of as many classes (`next`, not null; see RowsAhead), it also returns that row's lane
// maxima, found in the same loop. A soft term with exact rows (a dense teacher's) also leaves the gradient's
// GradientSize in `size`, lane by lane: its largest entry, and the terms of the soft and the hard parts' entries,
// each entry's rounding relative to them. (The largest is the whole entry's, soft and hard: at a student that all but
// balances the two, as training does, the sum cancels. Each soft entry is then at most it plus the hard term's size.)
// A block's rows with class indices (Labelled, `labels`) have their whole hard entries at the labels put in here:
// after the pass, the label's entry was a scalar store into what the Packs of GradientSize had seen. A long row whose
// class index is not alone at its top needs no at_top (cross_entropy.hpp): AtTop false leaves out its selection.
template <class T, class Terms, bool Labelled = false, bool AtTop = true>
KDLOSS_NOINLINE LaneMaxima<T> write_gradient(T* gradient, const RowBuffers<T>& row,
                                             const GradientCoefficients<T, Terms>& coefficients, std::size_t n,
                                             RowLogits<T> next, GradientSize<Pack<T>>* size = nullptr,
                                             const BlockLabels<T>* labels = nullptr) noexcept {
    const GradientCoefficients<T, Terms> k = coefficients;  // local copies, which the stores below cannot alias
    const RowBuffers<T> buffers = row;
    // A block's rows are n = lanes x classes elements, a multiple of lanes, and run forwards from 0 (a block is far
    // shorter than long_row_bytes): `column`, each lane's class at i, counts the blocks of lanes.
    Pack<T> label_classes, label_entries, column;
    if constexpr (Labelled) {
        label_classes = Pack<T>::load(labels->classes);
        label_entries = labels->entries;
    }
    constexpr bool sized = Terms::soft && Terms::exact_rows;
    Pack<T> largest;  // size's, kept apart from `size` itself, which the stores might alias
    auto at = [&](std::size_t i) KDLOSS_INLINE_LAMBDA {
        Pack<T> g;
        const Pack<T> e_student = Pack<T>::load(buffers.student_soft + i);
        if constexpr (Terms::soft) g = k.soft.gradient(i, e_student, buffers);
        if constexpr (Labelled) {
            g += select(label_classes == column, label_entries, k.hard.off_labels(i, e_student, buffers));
            column += T(1);
        } else if constexpr (Terms::class_index && !AtTop) {
            g += k.hard.off_labels(i, e_student, buffers);
        } else if constexpr (Terms::hard) {
            k.hard.add_to_gradient(g, i, e_student, buffers);
        }
        if constexpr (sized) {
            const Pack<T> entry = magnitude(g);
            largest = select(entry > largest, entry, largest);
        }
        return g;
    };
    const std::size_t whole = n - n % lanes;
    Pack<T> last;
    if (whole != n) last = at(n - lanes);
    // Backwards for a long row: from the exponentials written last, and the next row's exponential pass
    // comes next, into the scratch touched last.
    const bool backwards = n * sizeof(T) > long_row_bytes;
    LaneMaximaScan<T, Terms::dense_teacher> scan{next.student, next.teacher};
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
    if constexpr (sized) {
        if constexpr (Terms::hard) *size = {largest, k.soft.terms_bound(largest + k.hard.size) + k.hard.size};
        else *size = {largest, k.soft.terms_bound(largest)};
    }
    return scan.maxima;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
