#pragma once

// sample_teacher's row kernel: num_samples draws with replacement from softmax(t / T), each distinct class
// listed once, by decreasing count (ties to the lower index), with log(count / num_samples). Per row:
//   (1) the maximum (row_scan.hpp), which also finds NaNs;
//   (2) the exponentials e_c = e^((t_c - max) / T), kept in scratch, and the running totals of their sums over
//       blocks of sample_block classes, in double;
//   (3) num_samples uniform numbers in [0, Z), Z the total (counter_rng.hpp: they depend on the seed and the
//       row alone), sorted, then walked against the running totals: whole blocks are skipped, and within a
//       block that holds a draw e_c is added up class by class (in double) until it passes the draw. Draw u
//       picks the first class c whose running sum passes u, so each class is drawn with probability e_c / Z
//       (to the rounding of its exponential, about an ulp of T). Since the sum passes u at c only if e_c > 0,
//       a class of probability 0 (a -inf logit, or one whose exponential is below T's normal range) is never
//       drawn. The sorted draws pick classes in increasing order, so equal picks are counted as they come.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/cache_problem.hpp"
#include "kdloss/detail/counter_rng.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/row_scan.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

static_assert(sample_block % lanes == 0, "a block is whole Packs");

// Pass (2) over a row of n logits whose largest is `max` (finite): writes e_c to exponentials[c], and 0 up to
// the end of the last block; cumulative[b] = the sum of the blocks before b (blocks_of(n) + 1 entries). Fetches
// `next` (n logits, or null) into cache on the way, for pass (1) of the next row (as top_k does).
template <class T>
KDLOSS_NOINLINE void block_exponentials(const T* x, std::size_t n, T max, Exp2Scale<T> scale, T* exponentials,
                                        double* cumulative, const T* next) noexcept {
    constexpr std::size_t packs = sample_block / lanes;
    const Pack<T> top(max);
    const std::size_t blocks = blocks_of(n);
    double total = 0.0;
    cumulative[0] = 0.0;
    for (std::size_t b = 0; b < blocks; ++b) {
        const std::size_t first = b * sample_block;
        Pack<T> block_sum;
        KDLOSS_UNROLL
        for (std::size_t p = 0; p < packs; ++p) {
            const std::size_t i = first + p * lanes;
            if (next != nullptr && i + lanes <= n) fetch_pack(next + i);
            // The last block's Packs past the row are -inf, whose exponentials are 0.
            const Pack<T> v = i + lanes <= n ? Pack<T>::load(x + i)
                              : i < n        ? load_padded(x + i, n - i)
                                             : Pack<T>(-std::numeric_limits<T>::infinity());
            const Pack<T> e = fast_exp2(v - top, scale);
            e.store(exponentials + i);
            block_sum += e;
        }
        // A block's lanes each add packs terms in T: a few ulps, as the exponentials themselves.
        total += widen(block_sum).sum();
        cumulative[b + 1] = total;
    }
}

// Ascending doubles: a comparison type of the kernel's namespace (see Better in top_k_rows.hpp).
struct Ascending {
    bool operator()(double a, double b) const noexcept { return a < b; }
};

// By decreasing count, ties to the lower index.
struct MoreDrawn {
    bool operator()(const DrawnClass& a, const DrawnClass& b) const noexcept {
        return a.count > b.count || (a.count == b.count && a.index < b.index);
    }
};

// Pass (3): the draws of row `row`, counted into `drawn` by increasing class; returns how many classes.
template <class T>
KDLOSS_NOINLINE std::size_t draw_classes(const CacheProblem<T>& problem, std::size_t row, const T* exponentials,
                                         const double* cumulative, double* draws, DrawnClass* drawn) noexcept {
    const std::size_t blocks = blocks_of(problem.classes);
    const double total = cumulative[blocks];
    const RowGenerator generator(problem.seed, row);
    for (std::size_t j = 0; j < problem.num_samples; ++j) draws[j] = generator.uniform(j) * total;
    std::sort(draws, draws + problem.num_samples, Ascending{});

    // A draw that rounding put at or above the total falls in the last block that has mass.
    std::size_t last_block = blocks - 1;
    while (last_block > 0 && !(cumulative[last_block + 1] > cumulative[last_block])) --last_block;

    std::size_t listed = 0;
    std::size_t block = 0;
    std::size_t walked_block = blocks;  // the block whose walk (c, sum) is under way; none yet
    std::size_t c = 0;
    double sum = 0.0;
    for (std::size_t j = 0; j < problem.num_samples; ++j) {
        const double u = draws[j];
        while (block < blocks && !(cumulative[block + 1] > u)) ++block;
        if (block == blocks) block = last_block;
        if (walked_block != block) {
            walked_block = block;
            c = block * sample_block;
            sum = cumulative[block];
        }
        const std::size_t block_end = (block + 1) * sample_block;
        std::size_t picked = block_end;
        for (; c < block_end; ++c) {
            const double next = sum + static_cast<double>(exponentials[c]);
            if (next > u) {
                picked = c;
                break;
            }
            sum = next;
        }
        if (picked == block_end) {
            // The block's sum class by class fell short of its total by rounding: its last class with mass,
            // which a block whose total passed u has.
            picked = block_end - 1;
            while (!(exponentials[picked] > T(0))) --picked;
        }
        const auto index = static_cast<std::int32_t>(picked);
        if (listed > 0 && drawn[listed - 1].index == index) ++drawn[listed - 1].count;
        else drawn[listed++] = {1, index};
    }
    return listed;
}

template <class T>
std::size_t sample_rows(const CacheProblem<T>& problem, std::size_t begin, std::size_t end,
                        const CacheScratch<T>& scratch) noexcept {
    const Exp2Scale<T> scale = soft_exponent<T>(problem.temperature);
    const std::size_t n = problem.classes;
    const auto samples = static_cast<double>(problem.num_samples);
    const bool fetch_next = n * sizeof(T) <= long_row_bytes;  // as the loss kernels do (lane_math.hpp)
    for (std::size_t row = begin; row < end; ++row) {
        const auto r = static_cast<std::ptrdiff_t>(row);
        const T* x = problem.logits + r * problem.logit_stride;
        const RowMaximum<T> max = row_maximum(x, n);
        // NaN and +inf have no softmax, nor has a row of -inf alone.
        if (max.has_nan ||
            !(max.value > -std::numeric_limits<T>::infinity() && max.value < std::numeric_limits<T>::infinity()))
            return row;
        const T* next = row + 1 < end && fetch_next ? x + problem.logit_stride : nullptr;
        block_exponentials(x, n, max.value, scale, scratch.exponentials, scratch.cumulative, next);
        const std::size_t listed =
            draw_classes(problem, row, scratch.exponentials, scratch.cumulative, scratch.draws, scratch.drawn);
        std::sort(scratch.drawn, scratch.drawn + listed, MoreDrawn{});
        std::int32_t* indices = problem.indices + r * problem.index_stride;
        T* logprobs = problem.logprobs + r * problem.logprob_stride;
        for (std::size_t j = 0; j < listed; ++j) {
            indices[j] = scratch.drawn[j].index;
            logprobs[j] = static_cast<T>(std::log(static_cast<double>(scratch.drawn[j].count) / samples));
        }
        // Empty slots: -inf, at the index listed last (any index would do; this one keeps the row's indices
        // within those drawn).
        for (std::size_t j = listed; j < problem.slots; ++j) {
            indices[j] = scratch.drawn[listed - 1].index;
            logprobs[j] = -std::numeric_limits<T>::infinity();
        }
    }
    return no_bad_row;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
