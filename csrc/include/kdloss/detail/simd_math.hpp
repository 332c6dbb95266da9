#pragma once

// exp and log written as straight-line arithmetic on a scalar or a Pack (pack.hpp): libm's calls do not
// vectorise, short of -ffast-math and a libmvec that manylinux does not promise.
//
// exp, for x <= 0 only (the kernels exponentiate centred logits, (x - max) / T): Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, then a polynomial for e^r (float: minimax of degree 6; double: near-minimax
// of degree 11), whose error is below a tenth of an ulp; the result is within two ulps of the exact value
// (measured: 1.3 for float, 1.2 for double) and exactly 1 at 0. NaN stays NaN. Results below the smallest
// normal number, -inf's included, are flushed to 0: each exponential here is added to a sum that is at
// least 1, so the flushed values could not change a bit of it, and exact zeros are what the masks expect.
//
// log (double only; used on row sums, >= 1, and their ratios, > 0): x = 2^e m with m in [sqrt(1/2),
// sqrt(2)), then log m = 2 atanh(f), f = (m - 1) / (m + 1), by its odd series to f^19; within about one
// ulp, two just above 1. tests/cpp/test_simd_math.cpp checks both over their whole domains.

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class V>
using IfFloat = std::enable_if_t<std::is_same_v<ScalarOf<V>, float>, int>;
template <class V>
using IfDouble = std::enable_if_t<std::is_same_v<ScalarOf<V>, double>, int>;

template <class V, IfFloat<V> = 0>
KDLOSS_INLINE V fast_exp(V x) noexcept {
    constexpr float log2e = 1.44269504088896341f;
    constexpr float ln2_hi = 0.693359375f;       // few significant bits, so k * ln2_hi is exact
    constexpr float ln2_lo = -2.12194440e-4f;
    constexpr float round_magic = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer held in the low bits
    constexpr float lowest = -87.33654f;          // below this e^x is not a normal float

    // No clamp: below `lowest` the reduction below computes garbage (NaN at -inf), which the final select
    // replaces by 0, and no exception is trapped.
    const V shifted = x * log2e + round_magic;
    const V k = shifted - round_magic;
    const V r = (x - k * ln2_hi) - k * ln2_lo;
    // Minimax polynomial of e^r on [-ln2/2, ln2/2], relative error 1.9e-9 before rounding.
    V p = 1.383684578501276e-3f;
    p = p * r + 8.374815931135683e-3f;
    p = p * r + 4.166822558089392e-2f;
    p = p * r + 1.666642016835256e-1f;
    p = p * r + 4.999999207973155e-1f;
    p = p * r + 1.000000036323525f;
    p = p * r + 1.000000000554175f;
    // The integer k sits in the low mantissa bits of `shifted`; moving it into the exponent field scales by 2^k.
    const auto k_bits = to_bits(shifted) - to_bits(round_magic);
    const V scale = from_bits((k_bits + std::uint32_t{127}) << 23);
    // Comparisons are false for NaN, which therefore falls through as NaN.
    return select(x < V(lowest), 0.0f, p * scale);
}

template <class V, IfDouble<V> = 0>
KDLOSS_INLINE V fast_exp(V x) noexcept {
    constexpr double log2e = 1.4426950408889634074;
    constexpr double ln2_hi = 6.93147180369123816490e-01;
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
    constexpr double lowest = -708.3964185322641;       // below this e^x is not a normal double

    // No clamp: below `lowest` the reduction below computes garbage (NaN at -inf), which the final select
    // replaces by 0, and no exception is trapped.
    const V shifted = x * log2e + round_magic;
    const V k = shifted - round_magic;
    const V r = (x - k * ln2_hi) - k * ln2_lo;
    // Near-minimax polynomial of e^r on [-ln2/2, ln2/2] (Chebyshev interpolation, degree 11), relative
    // error 4.2e-18 before rounding.
    V p = 2.5110037605963777712e-8;
    p = p * r + 2.7632639639041029749e-7;
    p = p * r + 2.7557240918578969823e-6;
    p = p * r + 2.4801485482328492419e-5;
    p = p * r + 1.9841269890047113707e-4;
    p = p * r + 1.3888888952314774652e-3;
    p = p * r + 8.3333333333196006109e-3;
    p = p * r + 4.1666666666488095495e-2;
    p = p * r + 1.6666666666666680806e-1;
    p = p * r + 5.0000000000000183855e-1;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const auto k_bits = to_bits(shifted) - to_bits(round_magic);
    const V scale = from_bits((k_bits + std::uint64_t{1023}) << 52);
    return select(x < V(lowest), 0.0, p * scale);
}

template <class V, IfDouble<V> = 0>
KDLOSS_INLINE V fast_log(V x) noexcept {
    constexpr double ln2_hi = 6.93147180369123816490e-01;
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    constexpr std::uint64_t mantissa_mask = (std::uint64_t{1} << 52) - 1;
    constexpr std::uint64_t exponent_one = std::uint64_t{1023} << 52;
    constexpr double sqrt2 = 1.4142135623730951;

    constexpr double two_52 = 4503599627370496.0;

    const auto bits = to_bits(x);
    // The biased exponent (< 2^11) placed in the mantissa of 2^52 is 2^52 + exponent exactly: an integer
    // to floating-point conversion that needs no conversion instruction, which SSE2 lacks for 64-bit lanes.
    V exponent = from_bits((bits >> 52) | to_bits(V(two_52))) - (two_52 + 1023.0);
    V m = from_bits((bits & mantissa_mask) | exponent_one);  // in [1, 2)
    const auto high = m > V(sqrt2);
    m = select(high, m * 0.5, m);
    exponent = select(high, exponent + 1.0, exponent);
    const V f = (m - 1.0) / (m + 1.0);
    const V s = f * f;
    // |f| <= (sqrt 2 - 1) / (sqrt 2 + 1) = 0.172: the first term left out, f^21 / 21, is 1e-17 of the result.
    V p = 1.0 / 19.0;
    p = p * s + 1.0 / 17.0;
    p = p * s + 1.0 / 15.0;
    p = p * s + 1.0 / 13.0;
    p = p * s + 1.0 / 11.0;
    p = p * s + 1.0 / 9.0;
    p = p * s + 1.0 / 7.0;
    p = p * s + 1.0 / 5.0;
    p = p * s + 1.0 / 3.0;
    const V log_m = 2.0 * f + 2.0 * f * s * p;
    const V result = exponent * ln2_hi + (log_m + exponent * ln2_lo);
    // Only sums and their ratios come here, normal positive numbers; NaN and +inf pass through unchanged.
    return select((x != x) | (x > V(std::numeric_limits<double>::max())), x, result);
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
