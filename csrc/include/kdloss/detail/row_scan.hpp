#pragma once

// What the cache builders' passes over a row of teacher logits share (top_k_rows.hpp, sample_rows.hpp). A
// Pack (pack.hpp) at a time; a row's last partial Pack is read from a copy padded with -inf, which adds
// nothing to a sum and is no maximum, so rows of any length, shorter than a Pack included, run through the
// same arithmetic.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/simd_math.hpp"

#if KDLOSS_VECTOR_EXTENSIONS && defined(__AVX__)
#include <immintrin.h>
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// Whether any lane of a comparison holds: a branch the scans take rarely. One test instruction where the
// target has one (GNU vectors have no horizontal operation: folding the lanes by hand took twenty).
template <class T>
KDLOSS_INLINE bool any_lane(const Mask<T>& mask) noexcept {
    auto folded = mask.part[0];
    KDLOSS_UNROLL
    for (std::size_t i = 1; i < parts<T>; ++i) folded = folded | mask.part[i];
#if KDLOSS_VECTOR_EXTENSIONS && defined(__AVX512F__)
    const auto bits = reinterpret_cast<__m512i>(folded);
    return _mm512_test_epi32_mask(bits, bits) != 0;
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__AVX__)
    const auto bits = reinterpret_cast<__m256i>(folded);
    return _mm256_testz_si256(bits, bits) == 0;
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__SSE2__)
    return _mm_movemask_epi8(reinterpret_cast<__m128i>(folded)) != 0;
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__aarch64__)
    return vmaxvq_u32(reinterpret_cast<uint32x4_t>(folded)) != 0;
#elif KDLOSS_VECTOR_EXTENSIONS
    std::uint64_t words[sizeof folded / sizeof(std::uint64_t)];
    std::memcpy(words, &folded, sizeof folded);
    std::uint64_t any = 0;
    for (std::size_t i = 0; i < sizeof words / sizeof words[0]; ++i) any |= words[i];
    return any != 0;
#else
    return any_lane_of(folded);  // intrinsic_registers.hpp's
#endif
}

// Fetches the cache lines of a Pack's elements from x into cache, to be read soon.
template <class T>
KDLOSS_INLINE void fetch_pack(const T* x) noexcept {
    constexpr std::size_t line = 64 / sizeof(T);  // elements in a cache line
    for (std::size_t j = 0; j < lanes; j += line) KDLOSS_PREFETCH(x + j);
}

// The `count` < lanes elements from x as a Pack, the lanes after them -inf.
template <class T>
KDLOSS_INLINE Pack<T> load_padded(const T* x, std::size_t count) noexcept {
    T padded[lanes];
    for (std::size_t lane = 0; lane < lanes; ++lane) padded[lane] = -std::numeric_limits<T>::infinity();
    std::memcpy(padded, x, count * sizeof(T));
    return Pack<T>::load(padded);
}

// A row's largest logit, and whether it holds a NaN (which no maximum sees: a comparison with it is false).
template <class T>
struct RowMaximum {
    T value;
    bool has_nan;
};

template <class T>
KDLOSS_NOINLINE RowMaximum<T> row_maximum(const T* x, std::size_t n) noexcept {
    constexpr std::size_t unroll = 4;  // independent maxima, so that the selects do not wait on each other
    Pack<T> maxima[unroll];
    Mask<T> nan[unroll];
    for (std::size_t u = 0; u < unroll; ++u) {
        maxima[u] = Pack<T>(-std::numeric_limits<T>::infinity());
        nan[u] = Pack<T>() != Pack<T>();
    }
    auto update = [&](std::size_t u, const Pack<T>& v) KDLOSS_INLINE_LAMBDA {
        maxima[u] = select(v > maxima[u], v, maxima[u]);
        nan[u] = nan[u] | (v != v);
    };
    const std::size_t whole = n - n % lanes;
    std::size_t i = 0;
    for (; i + unroll * lanes <= whole; i += unroll * lanes) {
        KDLOSS_UNROLL
        for (std::size_t u = 0; u < unroll; ++u) update(u, Pack<T>::load(x + i + u * lanes));
    }
    for (; i < whole; i += lanes) update(0, Pack<T>::load(x + i));
    if (whole != n) update(0, load_padded(x + whole, n - whole));
    for (std::size_t u = 1; u < unroll; ++u) {
        update(0, maxima[u]);
        nan[0] = nan[0] | nan[u];
    }
    return {maxima[0].max(), any_lane(nan[0])};
}

// Adds e^((x - max) / T) for a Pack of logits x: the maximum's terms (x = max, each exactly 1) counted apart,
// so that log Z = log1p(maxima - 1 + rest) keeps a confident row's tiny rest, which a float sum that
// included the 1 would round away (as the cross-entropy does, cross_entropy.hpp).
template <class T>
struct PartitionPartials {
    Pack<T> rest, maxima;

    KDLOSS_INLINE void add(const Pack<T>& x, const Pack<T>& max, Exp2Scale<T> scale) noexcept {
        const Pack<T> dx = x - max;
        const Pack<T> e = fast_exp2(dx, scale);
        const Mask<T> at_max = dx == Pack<T>();
        rest = select(at_max, rest, rest + e);
        maxima = select(at_max, maxima + T(1), maxima);
    }
};

// Elements a lane sums in T before its partial sums are added to double totals: 64 float terms, as the loss
// kernels do (lane_math.hpp), while they are good to a few ulps.
template <class T>
constexpr std::size_t partition_chunk = lanes * (std::is_same_v<T, float> ? 64 : 256);

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
