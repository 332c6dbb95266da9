#pragma once

// exp and log written as straight-line arithmetic on a scalar or a Pack (pack.hpp): libm's calls do not
// vectorise, short of -ffast-math and a libmvec that manylinux does not promise.
//
// exp2, the kernels' exponential: 2^(x scale) for x scale <= 0 (they pass centred logits x = s - max s and
// scale = log2(e) / T, so that 2^(x scale) = e^(x/T)). Base 2 makes the reduction exact and cheap:
// k = round(x scale) and f = x scale - k in [-1/2, 1/2], computed from x by fused multiply-adds, so that the
// product x scale is rounded once, inside f; then 2^f by a polynomial (float: minimax of degree 6, relative
// error 2e-9; double: degree 11, 4e-18) and 2^k put straight into the exponent bits. Where the target can
// look up a table in a register (AVX-512, and AVX2 for float), k counts sixteenths (eighths) instead, and
// 2^(k mod 16 / 16) comes from a table, which leaves a polynomial of half the degree (exp2_by_table). Within
// 1.5 ulps of 2^x for an exact product (scale 1; measured 0.89 to 1.21 by build, see the test); otherwise
// rounding `scale` itself moves the result by about |x scale| / 2 ulps, as rounding x / T would in base e.
// Exactly 1 at 0; NaN stays NaN. Results below the smallest normal number, -inf's included, are flushed to
// 0 (from x < lowest_x, whose rounding may let a result within an ulp of that number through as a
// subnormal): each exponential here is added to a sum that is at least 1, so the flushed values could not
// change a bit of it, and exact zeros are what the masks expect.
//
// log, of positive normal numbers (NaN and +inf pass through; 0 and subnormals give finite values, which the
// callers weigh by 0 or by less than the smallest normal number): x = 2^e m with m in [sqrt(1/2), sqrt(2)).
// double (row sums, >= 1, and their ratios, and the double mixture divergences' ratios): log m = 2 atanh(f),
// f = (m - 1) / (m + 1), by its odd series to f^19; float (the mixture divergences' per-element ratios):
// Cephes' polynomial in m - 1, without a division. Within about one ulp, two just above 1.
// tests/cpp/test_simd_math.cpp checks them over their whole domains.

#include <cstddef>
#include <cstdint>
#include <iterator>
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

// The scale of an exp2 and the x below which its results are flushed to 0.
template <class T>
struct Exp2Scale {
    T scale;
    T lowest_x;
};

template <class T>
Exp2Scale<T> exp2_scale(double scale) noexcept {
    constexpr double lowest_normal_exponent = std::is_same_v<T, float> ? -126.0 : -1022.0;
    const T rounded = static_cast<T>(scale);
    return {rounded, static_cast<T>(lowest_normal_exponent / static_cast<double>(rounded))};
}

// 2^(j / Entries) for j < Entries, rounded to T, and the polynomial that finishes 2^f on |f| <= 1 / (2 Entries):
// 2^f = 1 + f P(f), P's coefficients lowest first, a Chebyshev interpolant of (2^f - 1) / f whose relative
// error is given before rounding. (tests/cpp/test_simd_math.cpp checks the entries against long double.)
template <class T, std::size_t Entries>
struct Exp2Table;
template <>
struct Exp2Table<float, 16> {  // error 2.4e-9
    static constexpr float entry[16] = {0x1.0p+0f,      0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f,
                                        0x1.306fep+0f,  0x1.3dea64p+0f, 0x1.4bfdaep+0f, 0x1.5ab07ep+0f,
                                        0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
                                        0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};
    static constexpr float p[3] = {0.6931471824645996f, 0.24023355543613434f, 0.05550508573651314f};
};
template <>
struct Exp2Table<float, 8> {  // error 3.4e-10
    static constexpr float entry[8] = {0x1.0p+0f,      0x1.172b84p+0f, 0x1.306fep+0f,  0x1.4bfdaep+0f,
                                       0x1.6a09e6p+0f, 0x1.8ace54p+0f, 0x1.ae89fap+0f, 0x1.d5818ep+0f};
    static constexpr float p[4] = {0.6931471824645996f, 0.24022650718688965f, 0.05550931766629219f,
                                   0.009618731215596199f};
};
template <>
struct Exp2Table<double, 16> {  // error 1.5e-17
    static constexpr double entry[16] = {0x1.0p+0,
                                         0x1.0b5586cf9890fp+0,
                                         0x1.172b83c7d517bp+0,
                                         0x1.2387a6e756238p+0,
                                         0x1.306fe0a31b715p+0,
                                         0x1.3dea64c123422p+0,
                                         0x1.4bfdad5362a27p+0,
                                         0x1.5ab07dd485429p+0,
                                         0x1.6a09e667f3bcdp+0,
                                         0x1.7a11473eb0187p+0,
                                         0x1.8ace5422aa0dbp+0,
                                         0x1.9c49182a3f09p+0,
                                         0x1.ae89f995ad3adp+0,
                                         0x1.c199bdd85529cp+0,
                                         0x1.d5818dcfba487p+0,
                                         0x1.ea4afa2a490dap+0};
    static constexpr double p[6] = {0.6931471805599457,   0.24022650695910075,   0.0555041086566393,
                                    0.009618129106919537, 0.0013333781576784268, 0.00015403723980749256};
};

// exp2 through a table, where the target can look one up (lookup_entries in pack.hpp): with k =
// round(x scale Entries) = Entries q + j, 2^(x scale) = 2^q 2^(j / Entries) 2^f, f = x scale - k / Entries.
// The table leaves a polynomial of half the degree or less (float: 3 instead of 6, double: 6 instead of 11);
// its multiply-adds are what the kernels' exponential pass is bound by.
template <class T, std::size_t Entries = lookup_entries<BitsOf<T>>>
KDLOSS_INLINE Pack<T> exp2_by_table(const Pack<T>& x, Exp2Scale<T> e) noexcept {
    using Bits = BitsOf<T>;
    using Table = Exp2Table<T, Entries>;
    constexpr int mantissa_bits = std::numeric_limits<T>::digits - 1;
    constexpr int index_bits = Entries == 16 ? 4 : 3;
    constexpr int index_shift = mantissa_bits - index_bits;
    // Adding 1.5 * 2^(mantissa_bits - index_bits), whose ulp is 1 / Entries, rounds x scale to k / Entries
    // and leaves k in the low bits (two's complement, over 1.5 * 2^mantissa_bits's own).
    constexpr T round_magic = T(1.5) * T(Bits{1} << index_shift);
    const Pack<T> scale(e.scale);
    const Pack<T> shifted = fused_multiply_add(x, scale, Pack<T>(round_magic));
    const Pack<T> f = fused_multiply_add(x, scale, round_magic - shifted);  // |f| <= 1 / (2 Entries), exactly
    const Pack<Bits> k_bits = to_bits(shifted);
    // k's bits shifted left by index_shift put q in the exponent field, and j just below it, where each
    // entry has (j << index_shift) taken off in advance: entry + shifted bits is 2^(j / Entries) 2^q.
    // (The table is a constant, built outside the kernels' loops.)
    Bits table_bits[lanes];
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < lanes; ++i)
        table_bits[i] = to_bits(Table::entry[i % Entries]) - (static_cast<Bits>(i % Entries) << index_shift);
    const Pack<T> scaled_entry = from_bits(lookup(Pack<Bits>::load(table_bits), k_bits) + (k_bits << index_shift));
    constexpr std::size_t terms = std::size(Table::p);
    Pack<T> p = Table::p[terms - 1];
    KDLOSS_UNROLL
    for (std::size_t i = 2; i <= terms; ++i) p = fused_multiply_add(p, f, Pack<T>(Table::p[terms - i]));
    // entry (1 + f P) as entry + entry (f P): one rounding, after the sum.
    const Pack<T> result = fused_multiply_add(scaled_entry, p * f, scaled_entry);
    return select(x < Pack<T>(e.lowest_x), T(0), result);
}

// exp2 by polynomial alone, for targets without a lookup.
template <class V, IfFloat<V> = 0>
KDLOSS_INLINE V exp2_by_polynomial(V x, Exp2Scale<float> e) noexcept {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits; adding the exponent bias too
    // leaves k + 127 there, which a shift moves into the exponent field (1.5 * 2^23's own bits shift out).
    constexpr float round_magic = 12582912.0f + 127.0f;

    // No clamp: below lowest_x the steps below compute garbage (NaN at -inf), which the final select
    // replaces by 0, and no exception is trapped.
    const V scale(e.scale);
    const V shifted = fused_multiply_add(x, scale, V(round_magic));
    const V f = fused_multiply_add(x, scale, round_magic - shifted);  // the product is rounded only here
    // Minimax polynomial of 2^f on [-1/2, 1/2]: the one of e^r on [-ln2/2, ln2/2], r = f ln2.
    V p = 1.534581242594868e-4f;
    p = fused_multiply_add(p, f, V(1.339993090368807e-3f));
    p = fused_multiply_add(p, f, V(9.618489071726799e-3f));
    p = fused_multiply_add(p, f, V(5.550328642129898e-2f));
    p = fused_multiply_add(p, f, V(2.402264624834061e-1f));
    p = fused_multiply_add(p, f, V(6.931471824645996e-1f));
    p = fused_multiply_add(p, f, V(1.0f));
    const V two_k = from_bits(to_bits(shifted) << 23);
    // Comparisons are false for NaN, which therefore falls through as NaN (a multiply keeps it NaN, where
    // adding k to p's exponent bits could turn a NaN's payload into a number).
    return select(x < V(e.lowest_x), 0.0f, p * two_k);
}

template <class V, IfDouble<V> = 0>
KDLOSS_INLINE V exp2_by_polynomial(V x, Exp2Scale<double> e) noexcept {
    constexpr double round_magic = 6755399441055744.0 + 1023.0;  // 1.5 * 2^52 + the bias, as for float

    const V scale(e.scale);
    const V shifted = fused_multiply_add(x, scale, V(round_magic));
    const V f = fused_multiply_add(x, scale, round_magic - shifted);
    // 2^f on [-1/2, 1/2]: a Chebyshev interpolant of e^r on [-ln2/2, ln2/2], r = f ln2, relative error 4.2e-18
    // before rounding.
    V p = 4.4558179083360645e-10;
    p = fused_multiply_add(p, f, V(7.074194297288521e-9));
    p = fused_multiply_add(p, f, V(1.0178057087733941e-7));
    p = fused_multiply_add(p, f, V(1.3215432535912377e-6));
    p = fused_multiply_add(p, f, V(1.5252733841556772e-5));
    p = fused_multiply_add(p, f, V(1.5403530463724356e-4));
    p = fused_multiply_add(p, f, V(1.333355814640647e-3));
    p = fused_multiply_add(p, f, V(9.618129107587258e-3));
    p = fused_multiply_add(p, f, V(5.5504108664821625e-2));
    p = fused_multiply_add(p, f, V(2.402265069591016e-1));
    p = fused_multiply_add(p, f, V(6.931471805599453e-1));
    p = fused_multiply_add(p, f, V(1.0));
    const V two_k = from_bits(to_bits(shifted) << 52);
    return select(x < V(e.lowest_x), 0.0, p * two_k);
}

// The kernels' exp2: through the table where the target has a lookup of T's width, else by polynomial.
template <class T>
KDLOSS_INLINE Pack<T> fast_exp2(const Pack<T>& x, Exp2Scale<T> e) noexcept {
    if constexpr (lookup_entries<BitsOf<T>> != 0) return exp2_by_table(x, e);
    else return exp2_by_polynomial(x, e);
}

template <class V, IfDouble<V> = 0>
KDLOSS_INLINE V fast_log(V x) noexcept {
    constexpr double ln2_hi = 6.93147180369123816490e-01;
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    constexpr std::uint64_t mantissa_mask = (std::uint64_t{1} << 52) - 1;
    constexpr std::uint64_t sqrt_half = 0x3FE6A09E667F3BCD;  // the bits of sqrt(1/2), rounded down
    constexpr double two_52 = 4503599627370496.0;

    // x = 2^e m, m in [sqrt(1/2), sqrt(2)), read off x's bits counted from sqrt(1/2)'s rather than from 1's:
    // (bits - sqrt_half) = e 2^52 + (m's bits - sqrt_half), offset by 1024 2^52 to stay unsigned. Four integer
    // operations, where splitting at 1 and then moving [sqrt(2), 2) down takes a comparison and two selects.
    const auto offset = to_bits(x) + ((std::uint64_t{1024} << 52) - sqrt_half);
    // e + 1024 (< 2^12) placed in the mantissa of 2^52 is 2^52 + e + 1024 exactly: an integer to floating-point
    // conversion that needs no conversion instruction, which SSE2 lacks for 64-bit lanes.
    const V exponent = from_bits((offset >> 52) | to_bits(V(two_52))) - (two_52 + 1024.0);
    const V m = from_bits((offset & mantissa_mask) + sqrt_half);
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
    // NaN and +inf pass through unchanged (one comparison: x <= max is false for both).
    return select(x <= V(std::numeric_limits<double>::max()), result, x);
}

// log(1 + r) for r > -1 (doubles, or Packs of them), within a few ulps of itself however small r is. fast_log(1 + r)
// alone keeps what rounding 1 + r leaves of r, 2^-53 of 1, which for r = 1e-5 is 1e-11 of the result. That
// rounding's error, (u - 1) - r with u = 1 + r, is exact, and log(1 + r) = log u - ((u - 1) - r) / u to first
// order in it. NaN and +inf pass through as fast_log's do (their correction is NaN, and left out).
template <class V, IfDouble<V> = 0>
KDLOSS_INLINE V fast_log1p(V r) noexcept {
    const V u = 1.0 + r;
    const V correction = ((u - 1.0) - r) / u;
    return fast_log(u) - select(correction == correction, correction, V(0.0));
}

// The float log's pieces: x = 2^e m, m in [sqrt(1/2), sqrt(2)), with e and t = m - 1 (exact, Sterbenz).
template <class V>
struct LogArgument {
    V exponent, t;
};

template <class V, IfFloat<V> = 0>
KDLOSS_INLINE LogArgument<V> log_argument(V x) noexcept {
    constexpr std::uint32_t mantissa_mask = (std::uint32_t{1} << 23) - 1;
    constexpr std::uint32_t sqrt_half = 0x3F3504F3;  // the bits of sqrt(1/2), rounded down
    constexpr float two_23 = 8388608.0f;
    // x = 2^e m, m in [sqrt(1/2), sqrt(2)), from the bits as in the double log, and e + 128 in the mantissa of 2^23.
    const auto offset = to_bits(x) + ((std::uint32_t{128} << 23) - sqrt_half);
    return {from_bits((offset >> 23) | to_bits(V(two_23))) - (two_23 + 128.0f),
            from_bits((offset & mantissa_mask) + sqrt_half) - 1.0f};
}

// log(1 + t) - t + added, for t in [sqrt(1/2) - 1, sqrt(2) - 1]: -t^2/2 + t^3 P(t), Cephes' logf polynomial,
// without the division of the double log's series (the mixture divergences take one or two logarithms an
// element, and their second pass is bound by the count of its operations). P by Estrin's scheme, not Horner's:
// four multiply-adds deep instead of nine, which the same pass also felt (its chain runs from the exponentials
// through a division and this logarithm to the sums). For t <= 0 both terms are negative: the result is exact
// relative to itself however small t is (mixture.hpp's log_one_minus takes it so).
template <class V, IfFloat<V> = 0>
KDLOSS_INLINE V log_one_plus_tail(V t, V added) noexcept {
    const V t2 = t * t;
    const V t4 = t2 * t2;
    const V p01 = t * -2.4999993993e-1f + 3.3333331174e-1f;
    const V p23 = t * -1.6668057665e-1f + 2.0000714765e-1f;
    const V p45 = t * -1.2420140846e-1f + 1.4249322787e-1f;
    const V p67 = t * -1.1514610310e-1f + 1.1676998740e-1f;
    const V p03 = p23 * t2 + p01;
    const V p47 = p67 * t2 + p45;
    const V p48 = t4 * 7.0376836292e-2f + p47;
    const V p = p48 * t4 + p03;
    return p * (t * t2) + (added - 0.5f * t2);
}

// ln 2 split so that e ln2_hi is exact for every exponent e of a float (ln2_hi has 9 significant bits).
constexpr float float_ln2_hi = 0.693359375f;
constexpr float float_ln2_lo = -2.12194440e-4f;

template <class V, IfFloat<V> = 0>
KDLOSS_INLINE V fast_log(V x) noexcept {
    const LogArgument<V> a = log_argument(x);
    const V result = (a.t + log_one_plus_tail(a.t, a.exponent * float_ln2_lo)) + a.exponent * float_ln2_hi;
    // NaN and +inf pass through unchanged.
    return select(x <= V(std::numeric_limits<float>::max()), result, x);
}

// e^x - 1 of doubles, relative to itself however small x is (the exact pass's u = p / q - 1, exact_kl_row.hpp),
// for x up to 700. Below ln(2)/2 in magnitude by Taylor's series to x^13 / 13!, whose first term left out is 4e-18
// of the result: x P(x), no subtraction; elsewhere exp_x - 1, exp_x = 2^(x log2(e)) by fast_exp2, where the result
// is at least 0.29 of exp_x in magnitude and exp2's few ulps stay a few (plus up to |x| from rounding the product x
// log2(e), 2 |x| without FMA: test_simd_math.cpp). NaN stays NaN.
KDLOSS_INLINE Pack<double> fast_expm1(const Pack<double>& x, const Pack<double>& exp_x) noexcept {
    const Pack<double> x2 = x * x;
    const Pack<double> x4 = x2 * x2;
    // 1 + x/2 + x^2/6 + ... + x^12/13!, by Estrin's scheme.
    const Pack<double> c01 = x * (1.0 / 2) + 1.0;
    const Pack<double> c23 = x * (1.0 / 24) + 1.0 / 6;
    const Pack<double> c45 = x * (1.0 / 720) + 1.0 / 120;
    const Pack<double> c67 = x * (1.0 / 40320) + 1.0 / 5040;
    const Pack<double> c89 = x * (1.0 / 3628800) + 1.0 / 362880;
    const Pack<double> c1011 = x * (1.0 / 479001600) + 1.0 / 39916800;
    const Pack<double> c03 = c23 * x2 + c01;
    const Pack<double> c47 = c67 * x2 + c45;
    const Pack<double> c811 = c1011 * x2 + c89;
    const Pack<double> c812 = x4 * (1.0 / 6227020800) + c811;
    const Pack<double> series = x * ((c812 * x4 + c47) * x4 + c03);
    const Pack<double> magnitude = from_bits(to_bits(x) & (~std::uint64_t{0} >> 1));
    return select(magnitude < Pack<double>(0.34657359027997264), series, exp_x - 1.0);
}
// The same, where e^x is not known already.
KDLOSS_INLINE Pack<double> fast_expm1(const Pack<double>& x) noexcept {
    return fast_expm1(x, fast_exp2(x, exp2_scale<double>(1.4426950408889634)));  // log2(e)
}

// log(1 + r) for r in [0, 1], exact relative to itself however small r is (within 3 ulps, test_simd_math.cpp).
// float: r P(r), P the Chebyshev interpolant of log(1 + r) / r at ten nodes of [0, 1] re-expanded in powers
// of r, with no division. double, where a polynomial would take twenty terms: 2 atanh(w), w = r / (2 + r) <=
// 1/3, whose series leaves out less than 2^-53 of itself after w^32 / 33.
template <class T>
KDLOSS_INLINE Pack<T> log_one_plus(const Pack<T>& r) noexcept {
    if constexpr (std::is_same_v<T, float>) {
        // By Estrin's scheme (fast_log's reason).
        const Pack<T> r2 = r * r;
        const Pack<T> r4 = r2 * r2;
        const Pack<T> p01 = r * -4.9999892648060534e-1f + 9.999999946562915e-1f;
        const Pack<T> p23 = r * -2.4951616262414725e-1f + 3.332971049886465e-1f;
        const Pack<T> p45 = r * -1.526966706883121e-1f + 1.9663274255110802e-1f;
        const Pack<T> p67 = r * -5.6373612750104135e-2f + 1.054362378672801e-1f;
        const Pack<T> p89 = r * -3.1760570101959967e-3f + 1.9542527221239617e-2f;
        const Pack<T> p03 = p23 * r2 + p01;
        const Pack<T> p47 = p67 * r2 + p45;
        const Pack<T> p49 = (p89 * r4) + p47;
        return (p49 * r4 + p03) * r;
    } else {
        const Pack<T> w = r / (T(2) + r);
        const Pack<T> w2 = w * w;
        Pack<T> series = T(1) / T(33);
        for (int k = 15; k >= 0; --k) series = series * w2 + T(1) / T(2 * k + 1);
        return T(2) * w * series;
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
