#pragma once

// top_k's row kernel: each row's k largest logits (ties to the lower index), sorted, with their exact
// log-softmax over the whole row. Two passes over a row, a Pack at a time:
//   (1) the maxima of about 2k groups of logits, each group one lane of consecutive Packs (top_k_groups),
//       which also finds NaNs, the one thing a comparison cannot see. The k-th largest of these maxima is a
//       threshold that at least k logits reach (the k groups' maxima), so every one of the k largest reaches it;
//       and since the k largest mostly fall in different groups, few others do (about k / 4 in random order);
//   (2) log Z = log sum_c e^((t_c - max) / T) over every class, and on the way the logits at or above the
//       threshold, taken out as candidates only where a Pack has one: a test and a rarely taken branch.
// Then the candidates' k best, sorted, and their log-probabilities (t_i - max) / T - log Z in double: no
// exponential of them is taken, so classes whose probability is below T's range keep exact log-probabilities.
//
// This replaced a heap of the k best so far, updated lane by lane whenever a Pack passed its root: about
// k ln(C / k) logits enter it in random order (400 of 32000 for k = 64), but each costs a sift through the
// heap's levels on unpredictable branches, and the scan took 3 to 4 times the two passes here.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/cache_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/row_scan.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// The order of the output: the larger logit first, and of equal ones the lower index. A total order on
// logits without NaN. (A type of the kernel's namespace, so that std::sort and std::nth_element are
// instantiated once per instruction set, never shared between them by the linker.)
struct Better {
    template <class T>
    bool operator()(const Candidate<T>& a, const Candidate<T>& b) const noexcept {
        return a.value > b.value || (a.value == b.value && a.index < b.index);
    }
};

struct Descending {
    template <class T>
    bool operator()(T a, T b) const noexcept {
        return a > b;
    }
};

// Pass (1) over a row of n logits: writes the maxima of its groups of `group_packs` Packs (lanes of them per
// group of Packs, top_k_groups(n, k) in all, -inf in lanes past the row) and returns the row's maximum.
template <class T>
KDLOSS_NOINLINE RowMaximum<T> group_maxima(const T* x, std::size_t n, std::size_t group_packs, T* maxima) noexcept {
    constexpr std::size_t unroll = 4;  // independent maxima, so that the selects do not wait on each other
    const Pack<T> minus_infinity(-std::numeric_limits<T>::infinity());
    Mask<T> nan = Pack<T>() != Pack<T>();
    Pack<T> row_max = minus_infinity;
    const std::size_t chunk = group_packs * lanes;
    for (std::size_t begin = 0; begin < n; begin += chunk, maxima += lanes) {
        const std::size_t end = n - begin < chunk ? n : begin + chunk;
        Pack<T> group[unroll] = {minus_infinity, minus_infinity, minus_infinity, minus_infinity};
        auto update = [&](std::size_t u, const Pack<T>& v) KDLOSS_INLINE_LAMBDA {
            group[u] = select(v > group[u], v, group[u]);
            nan = nan | (v != v);
        };
        std::size_t i = begin;
        for (; i + unroll * lanes <= end; i += unroll * lanes) {
            KDLOSS_UNROLL
            for (std::size_t u = 0; u < unroll; ++u) update(u, Pack<T>::load(x + i + u * lanes));
        }
        for (; i + lanes <= end; i += lanes) update(0, Pack<T>::load(x + i));
        if (i < end) update(0, load_padded(x + i, end - i));
        for (std::size_t u = 1; u < unroll; ++u) group[0] = select(group[u] > group[0], group[u], group[0]);
        group[0].store(maxima);
        row_max = select(group[0] > row_max, group[0], row_max);
    }
    return {row_max.max(), any_lane(nan)};
}

// Pass (2) over a row of n logits whose largest is `max` (finite): returns log Z, and writes the logits at or
// above `threshold` to candidates (n of room) and their number to `count`. Fetches `next` (n logits, or null)
// into cache on the way: this pass is bound by arithmetic, pass (1) by memory, and it then finds the next row
// there.
template <class T>
KDLOSS_NOINLINE double log_partition_and_candidates(const T* x, std::size_t n, T max, T threshold, Exp2Scale<T> scale,
                                                    Candidate<T>* candidates, std::size_t& count,
                                                    const T* next) noexcept {
    const Pack<T> top(max), bar(threshold);
    Pack<double> rest_total, maxima_total;
    PartitionPartials<T> partials;
    auto flush = [&]() KDLOSS_INLINE_LAMBDA {
        rest_total += widen(partials.rest);
        maxima_total += widen(partials.maxima);
        partials = {};
    };
    std::size_t taken = 0;
    // Without a branch per logit: each is written, and counted if it qualifies.
    auto take = [&](std::size_t i, std::size_t m) KDLOSS_INLINE_LAMBDA {
        for (std::size_t j = i; j < i + m; ++j) {
            candidates[taken] = {x[j], static_cast<std::int32_t>(j)};
            taken += x[j] >= threshold ? 1 : 0;
        }
    };
    const std::size_t whole = n - n % lanes;
    for (std::size_t begin = 0; begin < whole; begin += partition_chunk<T>) {
        const std::size_t end = whole - begin < partition_chunk<T> ? whole : begin + partition_chunk<T>;
        for (std::size_t i = begin; i < end; i += lanes) {
            if (next != nullptr) fetch_pack(next + i);
            const Pack<T> v = Pack<T>::load(x + i);
            partials.add(v, top, scale);
            if (any_lane((v > bar) | (v == bar))) take(i, lanes);
        }
        flush();
    }
    if (whole != n) {
        partials.add(load_padded(x + whole, n - whole), top, scale);
        take(whole, n - whole);  // not from the padded Pack: a threshold of -inf would take its padding
        flush();
    }
    count = taken;
    return std::log1p((maxima_total.sum() - 1.0) + rest_total.sum());
}

template <class T>
std::size_t top_k_rows(const CacheProblem<T>& problem, std::size_t begin, std::size_t end,
                       const CacheScratch<T>& scratch) noexcept {
    const Exp2Scale<T> scale = soft_exponent<T>(problem.temperature);
    const std::size_t n = problem.classes, k = problem.slots;
    const std::size_t group_packs = top_k_group_packs(n, k), groups = top_k_groups(n, k);
    Candidate<T>* candidates = scratch.candidates;
    const bool fetch_next = n * sizeof(T) <= long_row_bytes;  // as the loss kernels do (lane_math.hpp)
    for (std::size_t row = begin; row < end; ++row) {
        const auto r = static_cast<std::ptrdiff_t>(row);
        const T* x = problem.logits + r * problem.logit_stride;
        const RowMaximum<T> max = group_maxima(x, n, group_packs, scratch.group_maxima);
        // NaN and +inf have no softmax, nor has a row of -inf alone.
        if (max.has_nan ||
            !(max.value > -std::numeric_limits<T>::infinity() && max.value < std::numeric_limits<T>::infinity()))
            return row;
        std::nth_element(scratch.group_maxima, scratch.group_maxima + (k - 1), scratch.group_maxima + groups,
                         Descending{});
        const T threshold = scratch.group_maxima[k - 1];
        std::size_t count = 0;
        const T* next = row + 1 < end && fetch_next ? x + problem.logit_stride : nullptr;
        const double log_z = log_partition_and_candidates(x, n, max.value, threshold, scale, candidates, count, next);
        if (count > k) std::nth_element(candidates, candidates + k, candidates + count, Better{});
        std::sort(candidates, candidates + k, Better{});
        std::int32_t* indices = problem.indices + r * problem.index_stride;
        T* logprobs = problem.logprobs + r * problem.logprob_stride;
        for (std::size_t j = 0; j < k; ++j) {
            indices[j] = candidates[j].index;
            // -inf stays -inf: an empty slot.
            const double centred = static_cast<double>(candidates[j].value) - static_cast<double>(max.value);
            logprobs[j] = static_cast<T>(centred / problem.temperature - log_z);
        }
    }
    return no_bad_row;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
