#pragma once

// exp and log written as straight-line arithmetic, so that loops calling them auto-vectorise (libm's
// calls do not, short of -ffast-math and a libmvec that manylinux does not promise).
//
// exp, for x <= 0 only (the kernels exponentiate centred logits, (x - max) / T): Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, then a polynomial for e^r (float: minimax of degree 6; double: near-minimax
// of degree 11), whose error is below a tenth of an ulp; the result is within about two ulps of the correctly
// rounded value and exactly 1 at 0. NaN stays NaN. Results below the smallest normal number are flushed to
// 0: each exponential here is added to a sum that is at least 1, so the flushed values could not change a
// bit of it, and exact zeros are what the masks expect.
//
// log (double only; used on row sums, which are >= 1): x = 2^e m with m in [sqrt(1/2), sqrt(2)), then
// log m = 2 atanh(f), f = (m - 1) / (m + 1), by its odd series to f^23; within about one ulp.

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class To, class From>
inline To bits_as(From value) noexcept {
    static_assert(sizeof(To) == sizeof(From));
    To result;
    std::memcpy(&result, &value, sizeof result);
    return result;
}

// condition ? if_true : if_false, as bit masks rather than a branch. The compiler then never needs a
// conditional store to vectorise the loop around it, which instruction sets without masked stores (SSE2,
// NEON) cannot do.
template <class T>
inline T select(bool condition, T if_true, T if_false) noexcept {
    using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    const Bits mask = Bits(0) - static_cast<Bits>(condition);
    return bits_as<T>((bits_as<Bits>(if_true) & mask) | (bits_as<Bits>(if_false) & ~mask));
}

inline float fast_exp(float x) noexcept {
    constexpr float log2e = 1.44269504088896341f;
    constexpr float ln2_hi = 0.693359375f;       // few significant bits, so k * ln2_hi is exact
    constexpr float ln2_lo = -2.12194440e-4f;
    constexpr float round_magic = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer held in the low bits
    constexpr float lowest = -87.33654f;          // below this e^x is not a normal float

    const float clamped = select(x < lowest, lowest, x);
    const float shifted = clamped * log2e + round_magic;
    const float k = shifted - round_magic;
    const float r = (clamped - k * ln2_hi) - k * ln2_lo;
    // Minimax polynomial of e^r on [-ln2/2, ln2/2], relative error 1.9e-9 before rounding.
    float p = 1.383684578501276e-3f;
    p = p * r + 8.374815931135683e-3f;
    p = p * r + 4.166822558089392e-2f;
    p = p * r + 1.666642016835256e-1f;
    p = p * r + 4.999999207973155e-1f;
    p = p * r + 1.000000036323525f;
    p = p * r + 1.000000000554175f;
    // The integer k sits in the low mantissa bits of `shifted`; moving it into the exponent field scales by 2^k.
    const std::uint32_t k_bits = bits_as<std::uint32_t>(shifted) - bits_as<std::uint32_t>(round_magic);
    const float scale = bits_as<float>((k_bits + 127u) << 23);
    // Comparisons are false for NaN, which therefore falls through as NaN.
    return select(x < lowest, 0.0f, p * scale);
}

inline double fast_exp(double x) noexcept {
    constexpr double log2e = 1.4426950408889634074;
    constexpr double ln2_hi = 6.93147180369123816490e-01;
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
    constexpr double lowest = -708.3964185322641;       // below this e^x is not a normal double

    const double clamped = select(x < lowest, lowest, x);
    const double shifted = clamped * log2e + round_magic;
    const double k = shifted - round_magic;
    const double r = (clamped - k * ln2_hi) - k * ln2_lo;
    // Near-minimax polynomial of e^r on [-ln2/2, ln2/2] (Chebyshev interpolation, degree 11), relative
    // error 4.2e-18 before rounding.
    double p = 2.5110037605963777712e-8;
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
    const std::uint64_t k_bits = bits_as<std::uint64_t>(shifted) - bits_as<std::uint64_t>(round_magic);
    const double scale = bits_as<double>((k_bits + 1023u) << 52);
    return select(x < lowest, 0.0, p * scale);
}

inline double fast_log(double x) noexcept {
    constexpr double ln2_hi = 6.93147180369123816490e-01;
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    constexpr std::uint64_t mantissa_mask = (std::uint64_t{1} << 52) - 1;
    constexpr std::uint64_t exponent_one = std::uint64_t{1023} << 52;
    constexpr double sqrt2 = 1.4142135623730951;

    const std::uint64_t bits = bits_as<std::uint64_t>(x);
    double exponent = static_cast<double>(static_cast<std::int64_t>(bits >> 52) - 1023);
    double m = bits_as<double>((bits & mantissa_mask) | exponent_one);  // in [1, 2)
    const bool high = m > sqrt2;
    m = select(high, m * 0.5, m);
    exponent = select(high, exponent + 1.0, exponent);
    const double f = (m - 1.0) / (m + 1.0);
    const double s = f * f;
    double p = 1.0 / 23.0;
    p = p * s + 1.0 / 21.0;
    p = p * s + 1.0 / 19.0;
    p = p * s + 1.0 / 17.0;
    p = p * s + 1.0 / 15.0;
    p = p * s + 1.0 / 13.0;
    p = p * s + 1.0 / 11.0;
    p = p * s + 1.0 / 9.0;
    p = p * s + 1.0 / 7.0;
    p = p * s + 1.0 / 5.0;
    p = p * s + 1.0 / 3.0;
    const double log_m = 2.0 * f + 2.0 * f * s * p;
    const double result = exponent * ln2_hi + (log_m + exponent * ln2_lo);
    // Only sums >= 1 come here; NaN and +inf pass through unchanged.
    return select(x != x || x > std::numeric_limits<double>::max(), x, result);
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
