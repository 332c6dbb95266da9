#pragma once

// Numbers carried as an unevaluated sum hi + lo of two doubles (about 106 bits), and e^(x/T) with such a result,
// for the one place where double's own precision is not enough: a float64 row against a sparse teacher near a
// match (sparse_kl.hpp). A sparse teacher's probabilities are absolute numbers, given; the gradient at a listed
// class is T (q - pi), a difference of two nearly equal ones, and so, in effect, is the loss. A relative error e of
// the student's q (double's exponentials, their sum and its logarithm: e ~ 3e-16) moves that gradient by e q,
// against its size u q, u = pi / q - 1 ~ 2.5e-5 for a student 1e-4 per logit from the teacher at T = 4: 1e-11 of
// it, where float64's tolerance is 1e-12. (A dense teacher does not need this: its p is known relative to q.)
// It runs for such rows only: the exponentials of a row on Packs (ExactExponential::add), the rest scalar.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

struct DoubleDouble {
    double hi, lo;

    double value() const noexcept { return hi + lo; }
};

// a + b exactly, as the rounded sum and its error (Knuth's two-sum, for any order of magnitudes). No products:
// a compiler's contraction into fused multiply-adds cannot touch it.
inline DoubleDouble two_sum(double a, double b) noexcept {
    const double sum = a + b, b_part = sum - a;
    return {sum, (a - (sum - b_part)) + (b - b_part)};
}

// a b exactly: std::fma rounds once by definition, wherever it is computed.
inline DoubleDouble two_product(double a, double b) noexcept {
    const double product = a * b;
    return {product, std::fma(a, b, -product)};
}

// Sums and products within about 2^-104 of their operands (the two low parts added in double, as in Bailey's
// QD library's "sloppy" operations): where a - b cancels, its error stays that small absolutely, which is what the
// callers need (u = (pi Z - e) / e keeps its relative precision down to u ~ 1e-20).
inline DoubleDouble operator+(DoubleDouble a, DoubleDouble b) noexcept {
    const DoubleDouble sum = two_sum(a.hi, b.hi);
    return two_sum(sum.hi, sum.lo + (a.lo + b.lo));
}
inline DoubleDouble operator-(DoubleDouble a) noexcept { return {-a.hi, -a.lo}; }
inline DoubleDouble operator-(DoubleDouble a, DoubleDouble b) noexcept { return a + -b; }
inline DoubleDouble operator*(DoubleDouble a, DoubleDouble b) noexcept {
    const DoubleDouble product = two_product(a.hi, b.hi);
    return two_sum(product.hi, product.lo + (a.hi * b.lo + a.lo * b.hi));
}
// a / b for a double b, to about 2^-104.
inline DoubleDouble operator/(DoubleDouble a, double b) noexcept {
    const double first = a.hi / b;
    const DoubleDouble product = two_product(first, b);
    return two_sum(first, (((a.hi - product.hi) - product.lo) + a.lo) / b);
}
// a / b to double's precision (each rounded to a double first, which keeps its relative precision).
inline double quotient(DoubleDouble a, DoubleDouble b) noexcept { return a.value() / b.value(); }

// 2^(j / 64) for j < 64, as the nearest double and the rest (from a 60-digit mpmath; tests/cpp/test_simd_math.cpp
// checks them against long double).
inline constexpr DoubleDouble exp2_sixty_fourths[64] = {
    {0x1.0000000000000p+0, 0x0.0p+0},
    {0x1.02c9a3e778061p+0, -0x1.19083535b085dp-56},
    {0x1.059b0d3158574p+0, 0x1.d73e2a475b465p-55},
    {0x1.0874518759bc8p+0, 0x1.186be4bb284ffp-57},
    {0x1.0b5586cf9890fp+0, 0x1.8a62e4adc610bp-54},
    {0x1.0e3ec32d3d1a2p+0, 0x1.03a1727c57b53p-59},
    {0x1.11301d0125b51p+0, -0x1.6c51039449b3ap-54},
    {0x1.1429aaea92de0p+0, -0x1.32fbf9af1369ep-54},
    {0x1.172b83c7d517bp+0, -0x1.19041b9d78a76p-55},
    {0x1.1a35beb6fcb75p+0, 0x1.e5b4c7b4968e4p-55},
    {0x1.1d4873168b9aap+0, 0x1.e016e00a2643cp-54},
    {0x1.2063b88628cd6p+0, 0x1.dc775814a8495p-55},
    {0x1.2387a6e756238p+0, 0x1.9b07eb6c70573p-54},
    {0x1.26b4565e27cddp+0, 0x1.2bd339940e9d9p-55},
    {0x1.29e9df51fdee1p+0, 0x1.612e8afad1255p-55},
    {0x1.2d285a6e4030bp+0, 0x1.0024754db41d5p-54},
    {0x1.306fe0a31b715p+0, 0x1.6f46ad23182e4p-55},
    {0x1.33c08b26416ffp+0, 0x1.32721843659a6p-54},
    {0x1.371a7373aa9cbp+0, -0x1.63aeabf42eae2p-54},
    {0x1.3a7db34e59ff7p+0, -0x1.5e436d661f5e3p-56},
    {0x1.3dea64c123422p+0, 0x1.ada0911f09ebcp-55},
    {0x1.4160a21f72e2ap+0, -0x1.ef3691c309278p-58},
    {0x1.44e086061892dp+0, 0x1.89b7a04ef80d0p-59},
    {0x1.486a2b5c13cd0p+0, 0x1.3c1a3b69062f0p-56},
    {0x1.4bfdad5362a27p+0, 0x1.d4397afec42e2p-56},
    {0x1.4f9b2769d2ca7p+0, -0x1.4b309d25957e3p-54},
    {0x1.5342b569d4f82p+0, -0x1.07abe1db13cadp-55},
    {0x1.56f4736b527dap+0, 0x1.9bb2c011d93adp-54},
    {0x1.5ab07dd485429p+0, 0x1.6324c054647adp-54},
    {0x1.5e76f15ad2148p+0, 0x1.ba6f93080e65ep-54},
    {0x1.6247eb03a5585p+0, -0x1.383c17e40b497p-54},
    {0x1.6623882552225p+0, -0x1.bb60987591c34p-54},
    {0x1.6a09e667f3bcdp+0, -0x1.bdd3413b26456p-54},
    {0x1.6dfb23c651a2fp+0, -0x1.bbe3a683c88abp-57},
    {0x1.71f75e8ec5f74p+0, -0x1.16e4786887a99p-55},
    {0x1.75feb564267c9p+0, -0x1.0245957316dd3p-54},
    {0x1.7a11473eb0187p+0, -0x1.41577ee04992fp-55},
    {0x1.7e2f336cf4e62p+0, 0x1.05d02ba15797ep-56},
    {0x1.82589994cce13p+0, -0x1.d4c1dd41532d8p-54},
    {0x1.868d99b4492edp+0, -0x1.fc6f89bd4f6bap-54},
    {0x1.8ace5422aa0dbp+0, 0x1.6e9f156864b27p-54},
    {0x1.8f1ae99157736p+0, 0x1.5cc13a2e3976cp-55},
    {0x1.93737b0cdc5e5p+0, -0x1.75fc781b57ebcp-57},
    {0x1.97d829fde4e50p+0, -0x1.d185b7c1b85d1p-54},
    {0x1.9c49182a3f090p+0, 0x1.c7c46b071f2bep-56},
    {0x1.a0c667b5de565p+0, -0x1.359495d1cd533p-54},
    {0x1.a5503b23e255dp+0, -0x1.d2f6edb8d41e1p-54},
    {0x1.a9e6b5579fdbfp+0, 0x1.0fac90ef7fd31p-54},
    {0x1.ae89f995ad3adp+0, 0x1.7a1cd345dcc81p-54},
    {0x1.b33a2b84f15fbp+0, -0x1.2805e3084d708p-57},
    {0x1.b7f76f2fb5e47p+0, -0x1.5584f7e54ac3bp-56},
    {0x1.bcc1e904bc1d2p+0, 0x1.23dd07a2d9e84p-55},
    {0x1.c199bdd85529cp+0, 0x1.11065895048ddp-55},
    {0x1.c67f12e57d14bp+0, 0x1.2884dff483cadp-54},
    {0x1.cb720dcef9069p+0, 0x1.503cbd1e949dbp-56},
    {0x1.d072d4a07897cp+0, -0x1.cbc3743797a9cp-54},
    {0x1.d5818dcfba487p+0, 0x1.2ed02d75b3707p-55},
    {0x1.da9e603db3285p+0, 0x1.c2300696db532p-54},
    {0x1.dfc97337b9b5fp+0, -0x1.1a5cd4f184b5cp-54},
    {0x1.e502ee78b3ff6p+0, 0x1.39e8980a9cc8fp-55},
    {0x1.ea4afa2a490dap+0, -0x1.e9c23179c2893p-54},
    {0x1.efa1bee615a27p+0, 0x1.dc7f486a4b6b0p-54},
    {0x1.f50765b6e4540p+0, 0x1.9d3e12dd8a18bp-54},
    {0x1.fa7c1819e90d8p+0, 0x1.74853f3a5931ep-55},
};

// e^((x + x_lo) / T) for a double-double x + x_lo <= 709 T, within about 2^-58 of itself; 0 below 2^-1020.
// With A = T ln(2) / 64 and n = round(x / A): e^(x/T) = 2^(n / 64) e^r, r = (x - n A) / T, |r| <= ln(2) / 128.
// A is split into two parts of 26 and 27 bits (n A_1, n A_2 exact for |n| < 2^26) and a third, so that x - n A
// is rounded once, to 2^-53 of r T itself; e^r = 1 + p, p by its Taylor series to r^7 (r^8 / 8! < 2^-63), to 2^-53
// of p; the table entry's low part and p's product with it complete the sum: each rounding is 2^-53 of something
// below 2^-7 of the result.
class ExactExponential {
public:
    explicit ExactExponential(double temperature) noexcept : inverse_temperature_(1.0 / temperature) {
        constexpr double ln2_hi = 0x1.62e42fefa39efp-7, ln2_lo = 0x1.abc9e3b39803fp-62;  // ln(2) / 64
        const DoubleDouble step = two_product(temperature, ln2_hi) + DoubleDouble{temperature * ln2_lo, 0.0};
        std::uint64_t bits;
        std::memcpy(&bits, &step.hi, sizeof bits);
        bits &= ~((std::uint64_t{1} << 27) - 1);  // the top 26 bits of the significand
        std::memcpy(&step_1_, &bits, sizeof bits);
        step_2_ = step.hi - step_1_;  // exact: the other 27
        step_3_ = step.lo;
        steps_per_x_ = 1.0 / step.hi;
    }

    DoubleDouble operator()(double x, double x_lo = 0.0) const noexcept {
        const double n = std::floor(x * steps_per_x_ + 0.5);
        if (!(n >= -64.0 * 1020)) return {0.0, 0.0};  // (NaN x too: the callers pass none)
        const double r = ((((x - n * step_1_) - n * step_2_) - n * step_3_) + x_lo) * inverse_temperature_;
        constexpr double c2 = 1.0 / 2, c3 = 1.0 / 6, c4 = 1.0 / 24, c5 = 1.0 / 120, c6 = 1.0 / 720, c7 = 1.0 / 5040;
        const double p = r * (1.0 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))));  // e^r - 1
        const auto k = static_cast<std::int64_t>(n);
        const std::int64_t j = k & 63;
        const std::uint64_t scale_bits = static_cast<std::uint64_t>(1023 + (k - j) / 64) << 52;
        double scale;
        std::memcpy(&scale, &scale_bits, sizeof scale);
        const DoubleDouble entry = exp2_sixty_fourths[j];
        return {entry.hi * scale, (entry.hi * p + entry.lo) * scale};
    }

    // Sums of e^((s - max) / T) over Packs of logits s (-inf adds 0): their high parts by two-sum, lane by lane, the
    // errors and the low parts in double. Within about 2^-58 of the sum, as each term is.
    struct Sum {
        Pack<double> high, errors, low;

        DoubleDouble value() const noexcept {
            double high_lanes[lanes];
            high.store(high_lanes);
            DoubleDouble total{0.0, errors.sum() + low.sum()};
            for (std::size_t i = 0; i < lanes; ++i) {
                const DoubleDouble sum = two_sum(total.hi, high_lanes[i]);
                total = {sum.hi, total.lo + sum.lo};
            }
            return two_sum(total.hi, total.lo);
        }
    };

    // The same steps as operator()'s, lane by lane: n rounded by adding 1.5 2^52 (whose low bits then hold it, in
    // two's complement), the table entries gathered through a buffer.
    KDLOSS_INLINE void add(const Pack<double>& s, double max, Sum& sum) const noexcept {
        using V = Pack<double>;
        using Bits = Pack<std::uint64_t>;
        constexpr double round_magic = 0x1.8p52;
        const V ds = s - max, b_part = ds - s;
        const V ds_lo = (s - (ds - b_part)) + (V(-max) - b_part);  // two-sum's error: s - max = ds + ds_lo
        const V shifted = ds * steps_per_x_ + round_magic, n = shifted - round_magic;
        const V r = ((((ds - n * step_1_) - n * step_2_) - n * step_3_) + ds_lo) * inverse_temperature_;
        constexpr double c2 = 1.0 / 2, c3 = 1.0 / 6, c4 = 1.0 / 24, c5 = 1.0 / 120, c6 = 1.0 / 720, c7 = 1.0 / 5040;
        const V p = r * (1.0 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))));
        // k = n + 64 2048, non-negative down to the cut-off: its low 6 bits are j, the rest m + 2048.
        const Bits k = to_bits(shifted) - Bits(to_bits(round_magic) - 64 * 2048);
        std::uint64_t k_lanes[lanes];
        k.store(k_lanes);
        double entry_high[lanes], entry_low[lanes];
        for (std::size_t i = 0; i < lanes; ++i) {
            entry_high[i] = exp2_sixty_fourths[k_lanes[i] & 63].hi;
            entry_low[i] = exp2_sixty_fourths[k_lanes[i] & 63].lo;
        }
        const V scale = from_bits(((k >> 6) + Bits(std::uint64_t{1023} - 2048)) << 52);
        const V high = V::load(entry_high), low = V::load(entry_low);
        const Mask<double> zero = (n < V(-64.0 * 1020)) | (s == V(-std::numeric_limits<double>::infinity()));
        const V e_high = select(zero, 0.0, high * scale), e_low = select(zero, 0.0, (high * p + low) * scale);
        const V total = sum.high + e_high, e_part = total - sum.high;
        sum.errors += (sum.high - (total - e_part)) + (e_high - e_part);
        sum.high = total;
        sum.low += e_low;
    }

private:
    double inverse_temperature_, step_1_ = 0.0, step_2_ = 0.0, step_3_ = 0.0, steps_per_x_ = 0.0;
};

// e^x for a double x <= 709, within about 2^-100 of itself (0 below 2^-1020): where ExactExponential's 2^-58 is not
// enough, for the few numbers that are differences' operands, the teacher's probabilities (1 - sum p of a teacher
// that puts 1 - 1e-9 on one class may be 1e-17, and must be good to 1e-28). The same reduction, with r = x - n ln(2)
// / 64 kept in double-double (ln(2) / 64 in three parts, n < 2^17), and e^r - 1 =
// r (1 + r/2 (1 + r/3 (1 + ... (1 + r/12)))) in double-double (r^13 / 13! < 2^-110 for |r| <= ln(2) / 128).
// About 300 operations.
inline DoubleDouble precise_exponential(double x) noexcept {
    // ln(2) / 64 = part_1 + part_2 + part_3 to 2^-130 of it; part_1 of 26 bits, so that n part_1 is exact.
    constexpr double part_1 = 0x1.62e42f8000000p-7, part_2 = 0x1.be8e7bcd5e4f2p-33, part_3 = -0x1.319ff03425430p-88;
    const double n = std::floor(x * (64 / 0x1.62e42fefa39efp-1) + 0.5);
    if (!(n >= -64.0 * 1020)) return {0.0, 0.0};
    const DoubleDouble second = two_product(n, part_2);
    DoubleDouble r = two_sum(x - n * part_1, -second.hi);  // (x - n part_1 exact: Sterbenz)
    r.lo -= second.lo + n * part_3;
    DoubleDouble series{1.0, 0.0};
    for (int k = 12; k >= 2; --k) series = DoubleDouble{1.0, 0.0} + (r * series) / static_cast<double>(k);
    const DoubleDouble power = DoubleDouble{1.0, 0.0} + r * series;  // e^r
    const auto k = static_cast<std::int64_t>(n);
    const std::int64_t j = k & 63;
    const std::uint64_t scale_bits = static_cast<std::uint64_t>(1023 + (k - j) / 64) << 52;
    double scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    const DoubleDouble result = exp2_sixty_fourths[j] * power;
    return {result.hi * scale, result.lo * scale};
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
