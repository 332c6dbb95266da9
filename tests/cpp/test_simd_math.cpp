// The kernels' exp2 and log (kdloss/detail/simd_math.hpp) against the C library in higher precision, over
// their whole domain, through the Pack path the kernels use: exp2 on u <= 0 down past underflow and at
// -inf, log on the positive numbers the kernels give it (sums >= 1 and ratios of sums).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "kdloss/detail/double_double.hpp"
#include "kdloss/detail/mixture.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdtest.hpp"

namespace test_simd_math {

using kdloss::detail::lanes;
using kdloss::detail::Pack;

template <class T>
std::vector<T> apply_exp2(const std::vector<T>& xs, kdloss::detail::Exp2Scale<T> scale) {
    std::vector<T> out(xs.size());
    for (std::size_t i = 0; i + lanes <= xs.size(); i += lanes)
        kdloss::detail::fast_exp2(Pack<T>::load(xs.data() + i), scale).store(out.data() + i);
    return out;
}

// Distance from `value` to `exact` in units of the last place of T at `exact`.
template <class T>
double ulps(T value, long double exact) {
    const long double spacing =
        std::nextafter(static_cast<T>(exact), std::numeric_limits<T>::infinity()) - static_cast<T>(exact);
    return static_cast<double>(std::fabs(static_cast<long double>(value) - exact) / spacing);
}

// Worst distance, in ulps, of exp2 from 2^(x scale) with x scale evenly from 0 down to the flush threshold.
// `scale` is rounded to T first, and the exact value is that of the rounded scale: the error measured is
// the function's own, with the product x scale as it must round it.
template <class T>
double exp2_worst_ulps(double scale, std::size_t samples) {
    const auto e = kdloss::detail::exp2_scale<T>(scale);
    std::vector<T> xs;
    for (std::size_t i = 0; i < samples; ++i)
        xs.push_back(static_cast<T>(e.lowest_x * (static_cast<double>(i) / samples)));
    while (xs.size() % lanes) xs.push_back(T(0));
    const std::vector<T> ys = apply_exp2(xs, e);
    double worst = 0.0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
        const long double exact = std::exp2(static_cast<long double>(xs[i]) * static_cast<long double>(e.scale));
        if (exact < std::numeric_limits<T>::min() * 2) continue;  // next to the flush threshold: below
        worst = std::max(worst, ulps(ys[i], exact));
    }
    return worst;
}

KD_TEST(exp2_is_accurate_over_its_domain) {
    // An exact product (scale 1), measured (float, double): by polynomial 0.89 and 0.95 with FMA (AVX2), 1.16
    // and 1.21 without (SSE2); through the tables 0.99 and 1.11 (AVX-512). At the kernels' scale below,
    // with FMA: 0.90 and 1.05 (AVX2), 0.99 and 1.26 (AVX-512; 1.11 against a __float128 reference: long
    // double's own rounding of x scale shows when |x scale| is large).
    const std::size_t samples = kdtest::sized(2000000, 200000);
    KD_CHECK(exp2_worst_ulps<float>(1.0, samples) <= 1.5);
    KD_CHECK(exp2_worst_ulps<double>(1.0, samples) <= 1.5);
    // The kernels' scale, log2(e) / 3: with fused multiply-adds the product x scale is rounded only inside
    // the reduced argument, so the bound holds as is; without them it is rounded first, which costs up to
    // |x scale| / 2 ulps more (|x scale| reaches 126 for float, 1022 for double).
#if defined(__FMA__) || defined(__aarch64__)
    const double rounding_allowance[2] = {0.0, 0.0};
#else
    const double rounding_allowance[2] = {126.0 / 2, 1022.0 / 2};
#endif
    KD_CHECK(exp2_worst_ulps<float>(1.4426950408889634 / 3, samples) <= 1.5 + rounding_allowance[0]);
    KD_CHECK(exp2_worst_ulps<double>(1.4426950408889634 / 3, samples) <= 1.5 + rounding_allowance[1]);
}

// The entries of exp2's tables are 2^(j / N) correctly rounded. (Checked in every build: only the targets
// with a lookup use them, see exp2_takes_the_path_its_target_has.)
template <class T, std::size_t Entries>
void exp2_table_is_correctly_rounded() {
    for (std::size_t j = 0; j < Entries; ++j) {
        const long double exact = std::exp2(static_cast<long double>(j) / Entries);
        KD_CHECK(ulps(kdloss::detail::Exp2Table<T, Entries>::entry[j], exact) <= 0.5);
    }
}

KD_TEST(exp2_tables_are_correctly_rounded) {
    exp2_table_is_correctly_rounded<float, 16>();
    exp2_table_is_correctly_rounded<float, 8>();
    exp2_table_is_correctly_rounded<double, 16>();
}

// lookup() reads an index modulo the table's size, whatever the bits above.
template <class U>
void lookup_reads_its_index_modulo_the_entries() {
    constexpr std::size_t entries = kdloss::detail::lookup_entries<U>;
    if constexpr (entries != 0) {
        U table[lanes], index[lanes], found[lanes];
        for (std::size_t i = 0; i < lanes; ++i) table[i] = static_cast<U>(1000 + i);
        for (std::size_t high : {0u, 1u, 5u, 255u})
            for (std::size_t start = 0; start < entries; ++start) {
                for (std::size_t lane = 0; lane < lanes; ++lane)
                    index[lane] = static_cast<U>((start + 3 * lane) % entries + entries * (high + lane));
                lookup(Pack<U>::load(table), Pack<U>::load(index)).store(found);  // found by ADL, if it exists
                for (std::size_t lane = 0; lane < lanes; ++lane) KD_CHECK_EQ(found[lane], table[index[lane] % entries]);
            }
    }
}

KD_TEST(lookup_reads_indices_modulo_the_table) {
    lookup_reads_its_index_modulo_the_entries<std::uint32_t>();
    lookup_reads_its_index_modulo_the_entries<std::uint64_t>();
}

// The x86-64 builds of this file (tests/cpp/CMakeLists.txt) take the table path where their instruction
// set has a lookup, so that the tests above measure it: AVX-512 for float and double, AVX2 for float (GNU vectors
// and intrinsics registers alike).
KD_TEST(exp2_takes_the_path_its_target_has) {
#if defined(KDTEST_REQUIRED_ISA)
    const std::string isa = KDTEST_REQUIRED_ISA;
    KD_CHECK_EQ(kdloss::detail::lookup_entries<std::uint32_t>, std::size_t{isa == "avx512" ? 16u : 8u});
    KD_CHECK_EQ(kdloss::detail::lookup_entries<std::uint64_t>, std::size_t{isa == "avx512" ? 16u : 0u});
#endif
}

template <class T>
void exp2_special_values() {
    const T inf = std::numeric_limits<T>::infinity();
    std::vector<T> xs(lanes, T(0));
    xs[1] = -inf;
    xs[2] = std::numeric_limits<T>::quiet_NaN();
    xs[3] = -std::numeric_limits<T>::max();
    xs[4] = T(-1e30);
    xs[5] = std::is_same_v<T, float> ? T(-126.5f) : T(-1022.5);  // the exact result is below the normal range
    xs[6] = -std::numeric_limits<T>::denorm_min();
    xs[7] = std::is_same_v<T, float> ? T(-126.0f) : T(-1022.0);  // the smallest normal number, exactly
    const std::vector<T> ys = apply_exp2(xs, kdloss::detail::exp2_scale<T>(1.0));
    KD_CHECK_EQ(ys[0], T(1));  // exactly 1 at the maximum, which the normalising sums count on
    KD_CHECK_EQ(ys[1], T(0));
    KD_CHECK(std::isnan(ys[2]));
    KD_CHECK_EQ(ys[3], T(0));
    KD_CHECK_EQ(ys[4], T(0));
    KD_CHECK_EQ(ys[5], T(0));
    KD_CHECK_EQ(ys[6], T(1));
    KD_CHECK_EQ(ys[7], std::numeric_limits<T>::min());
}

KD_TEST(exp2_of_special_values) {
    exp2_special_values<float>();
    exp2_special_values<double>();
}

KD_TEST(log_is_accurate_on_positive_numbers) {
    std::vector<double> xs;
    for (double x = 1e-300; x < 1e300; x *= 1.0137) xs.push_back(x);
    for (int i = -100000; i <= 100000; ++i) xs.push_back(1.0 + i * 1e-9);  // ratios near 1: log near 0
    for (int i = 0; i < 100000; ++i) xs.push_back(1.0 + i * 1e-3);
    while (xs.size() % lanes) xs.push_back(1.0);
    double worst = 0.0;
    for (std::size_t i = 0; i < xs.size(); i += lanes) {
        double ys[lanes];
        kdloss::detail::fast_log(Pack<double>::load(xs.data() + i)).store(ys);
        for (std::size_t k = 0; k < lanes; ++k) {
            const long double exact = std::log(static_cast<long double>(xs[i + k]));
            if (exact == 0) {
                KD_CHECK_EQ(ys[k], 0.0);
                continue;
            }
            worst = std::max(worst, ulps(ys[k], exact));
        }
    }
    KD_CHECK(worst <= 2.5);  // measured: 2.0 just above 1, where the result is tiny; ~1 elsewhere
    double special[lanes] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()};
    for (std::size_t k = 2; k < lanes; ++k) special[k] = 1.0;
    double ys[lanes];
    kdloss::detail::fast_log(Pack<double>::load(special)).store(ys);
    KD_CHECK_EQ(ys[0], std::numeric_limits<double>::infinity());
    KD_CHECK(std::isnan(ys[1]));
    KD_CHECK_EQ(ys[2], 0.0);
}

// The float log (the mixture divergences' per-element ratios): every positive normal float between 2^-126 and
// 2^11, and a dense sweep near 1, where the result is tiny.
KD_TEST(float_log_is_accurate_on_positive_normal_numbers) {
    std::vector<float> xs;
    for (float x = std::numeric_limits<float>::min(); x < 2048.0f; x *= 1.00037f) xs.push_back(x);
    for (int i = -200000; i <= 200000; ++i) xs.push_back(std::nextafter(1.0f, i < 0 ? 0.0f : 2.0f) + i * 1e-7f);
    while (xs.size() % lanes) xs.push_back(1.0f);
    double worst = 0.0;
    for (std::size_t i = 0; i < xs.size(); i += lanes) {
        float ys[lanes];
        kdloss::detail::fast_log(Pack<float>::load(xs.data() + i)).store(ys);
        for (std::size_t k = 0; k < lanes; ++k) {
            const long double exact = std::log(static_cast<long double>(xs[i + k]));
            if (exact == 0) {
                KD_CHECK_EQ(ys[k], 0.0f);
                continue;
            }
            worst = std::max(worst, ulps(ys[k], exact));
        }
    }
    KD_CHECK(worst <= 2.5);
    float special[lanes] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
    for (std::size_t k = 2; k < lanes; ++k) special[k] = 1.0f;
    float ys[lanes];
    kdloss::detail::fast_log(Pack<float>::load(special)).store(ys);
    KD_CHECK_EQ(ys[0], std::numeric_limits<float>::infinity());
    KD_CHECK(std::isnan(ys[1]));
    KD_CHECK_EQ(ys[2], 0.0f);
}

// log(1 + r) on [0, 1] (jsd's second pass): from below the smallest normal number, where it is r itself, to 1,
// within 3 ulps (measured: float 1.7, double 2.7).
template <class T>
double log_one_plus_worst_ulps() {
    std::vector<T> xs = {T(0), std::numeric_limits<T>::denorm_min(), std::numeric_limits<T>::min()};
    for (T r = std::numeric_limits<T>::min(); r < T(1); r *= T(1.00037)) xs.push_back(r);
    for (int i = 0; i <= 100000; ++i) xs.push_back(static_cast<T>(i) / T(100000));
    while (xs.size() % lanes) xs.push_back(T(1));
    double worst = 0.0;
    for (std::size_t i = 0; i < xs.size(); i += lanes) {
        T ys[lanes];
        kdloss::detail::log_one_plus(Pack<T>::load(xs.data() + i)).store(ys);
        for (std::size_t k = 0; k < lanes; ++k) {
            const long double exact = std::log1p(static_cast<long double>(xs[i + k]));
            if (exact < std::numeric_limits<T>::min()) {
                // 0 and subnormal r: r itself, to the last place of subnormal numbers
                KD_CHECK(std::fabs(ys[k] - xs[i + k]) <= std::numeric_limits<T>::denorm_min());
                continue;
            }
            worst = std::max(worst, ulps(ys[k], exact));
        }
    }
    return worst;
}

KD_TEST(log_one_plus_is_accurate_on_the_unit_interval) {
    KD_CHECK(log_one_plus_worst_ulps<float>() <= 3.0);
    KD_CHECK(log_one_plus_worst_ulps<double>() <= 3.0);
}

// log(1 - x) and log(1 - x) + x (the skews' second pass, mixture.hpp), given x and y = 1 - x each rounded on its
// own, as the kernels' quotients are: x from 1e-30 to 1, with y the complement rounded (then each result is exact
// relative to itself, in ulps) and moved by an ulp either way (then within some ulps of 1, or of itself where
// larger: y's own rounding is all that says how far below 1 it is). The truth is taken from x where x <= 1/2 and
// from y above, the one of the two that fixes the result.
template <class T>
struct LogOneMinusErrors {
    double log = 0, plus = 0;              // y rounded: ulps
    double moved_log = 0, moved_plus = 0;  // y moved: ulps of max(|result|, 1)
};

template <class T>
LogOneMinusErrors<T> log_one_minus_errors() {
    std::vector<T> xs, ys;
    const long double step = kdtest::reduced ? 1.01L : 1.0003L;
    for (long double x = 1e-30L; x < 1; x *= step)
        for (int move = -1; move <= 1; ++move) {
            const T y = static_cast<T>(1 - x);
            xs.push_back(static_cast<T>(x));
            ys.push_back(move == 0 ? y : std::nextafter(y, move < 0 ? T(0) : T(2)));
        }
    while (xs.size() % lanes) {
        xs.push_back(T(0));
        ys.push_back(T(1));
    }
    LogOneMinusErrors<T> worst;
    for (std::size_t i = 0; i < xs.size(); i += lanes) {
        T logs[lanes], pluses[lanes];
        Pack<T> plus;
        kdloss::detail::log_one_minus(Pack<T>::load(xs.data() + i), Pack<T>::load(ys.data() + i), plus).store(logs);
        plus.store(pluses);
        for (std::size_t k = 0; k < lanes; ++k) {
            const long double x = xs[i + k], y = ys[i + k];
            if (x == 0) {
                KD_CHECK_EQ(logs[k], T(0));
                KD_CHECK_EQ(pluses[k], T(0));
                continue;
            }
            // -(x^2/2 + x^3/3 + ...), where log1p(-x) + x would cancel
            long double series = 0, power = x;
            for (int n = 2; n < 80; ++n) series += (power *= x) / n;
            const long double log = x <= 0.5L ? std::log1p(-x) : std::log(y);
            const long double plus_x = x <= 0.5L ? -series : std::log(y) + (1 - y);
            if (y == static_cast<T>(1 - x)) {
                worst.log = std::max(worst.log, ulps(logs[k], log));
                if (-plus_x >= std::numeric_limits<T>::min())
                    worst.plus = std::max(worst.plus, ulps(pluses[k], plus_x));
                else KD_CHECK(std::fabs(pluses[k]) <= 2 * std::numeric_limits<T>::min());  // below normal numbers
            } else {
                const long double epsilon = std::numeric_limits<T>::epsilon();
                const auto moved = [&](T got, long double exact) {
                    return static_cast<double>(std::fabs(got - exact) / std::max(std::fabs(exact), 1.0L) / epsilon);
                };
                worst.moved_log = std::max(worst.moved_log, moved(logs[k], log));
                worst.moved_plus = std::max(worst.moved_plus, moved(pluses[k], plus_x));
            }
        }
    }
    return worst;
}

// Measured (AVX2, and SSE2 alike): float 1.3 and 9.3 ulps (the latter where log(1 - x) + x is 0.05 against terms
// of 0.35), moved 1.1 and 1.3; double 1.8 and 14, moved 1.2 and 1.4.
KD_TEST(log_one_minus_is_accurate_relative_to_itself) {
    const LogOneMinusErrors<float> f = log_one_minus_errors<float>();
    const LogOneMinusErrors<double> d = log_one_minus_errors<double>();
    std::printf("log_one_minus: float %.2f %.2f ulps, moved %.2f %.2f; double %.2f %.2f, moved %.2f %.2f\n", f.log,
                f.plus, f.moved_log, f.moved_plus, d.log, d.plus, d.moved_log, d.moved_plus);
    KD_CHECK(f.log <= 3.0 && f.plus <= 20.0 && f.moved_log <= 2.0 && f.moved_plus <= 2.0);
    KD_CHECK(d.log <= 3.0 && d.plus <= 20.0 && d.moved_log <= 2.0 && d.moved_plus <= 2.0);
    // NaN stays NaN.
    float nan[lanes], out[lanes];
    for (float& v : nan) v = std::numeric_limits<float>::quiet_NaN();
    Pack<float> plus_nan;
    kdloss::detail::log_one_minus(Pack<float>::load(nan), Pack<float>::load(nan), plus_nan).store(out);
    KD_CHECK(std::isnan(out[0]));
    plus_nan.store(out);
    KD_CHECK(std::isnan(out[0]));
}

// e^x - 1 (the exact pass's u = p / q - 1, exact_kl_row.hpp) relative to itself, from 1e-300 to 700 in magnitude
// on both sides of 0: within 6 ulps below |x| = 1 (where e^x - 1 is at least 0.29 of e^x, exp2's ulps grow by that
// much), and 6 + 2 |x| beyond, where the product x log2(e) is rounded inside exp2 (twice, where there is no FMA).
// Measured: AVX2 3.6 and 3.4 + |x| / 2, SSE2 4.9 and 170 + |x| / 2.
KD_TEST(expm1_is_accurate_relative_to_itself) {
    std::vector<double> xs = {0.0};
    const double step = kdtest::reduced ? 1.01 : 1.0003;
    for (double x = 1e-300; x < 700.0; x *= step) {
        xs.push_back(x);
        xs.push_back(-x);
    }
    while (xs.size() % lanes) xs.push_back(0.0);
    double worst_near = 0.0, worst_excess = 0.0;
    for (std::size_t i = 0; i < xs.size(); i += lanes) {
        double ys[lanes];
        kdloss::detail::fast_expm1(Pack<double>::load(xs.data() + i)).store(ys);
        for (std::size_t k = 0; k < lanes; ++k) {
            const double x = xs[i + k];
            if (x == 0.0) {
                KD_CHECK_EQ(ys[k], 0.0);
                continue;
            }
            const double error = ulps(ys[k], std::expm1(static_cast<long double>(x)));
            if (std::fabs(x) < 1.0) worst_near = std::max(worst_near, error);
            worst_excess = std::max(worst_excess, error - std::fabs(x) / 2);
            KD_CHECK(error <= 6.0 + 2.0 * std::fabs(x));
        }
    }
    KD_CHECK(worst_near <= 6.0);
    std::printf("fast_expm1: %.2f ulps below |x| = 1, at most %.2f + |x| / 2 above\n", worst_near, worst_excess);
}

// double_double.hpp, for float64 rows against a sparse teacher near a match: ExactExponential within 2^-57 of
// e^(x/T) (|x/T| <= 20, where long double's own rounding of x/T stays below 2^-59), and precise_exponential within
// long double's precision of e^x; beyond that precision, by identities its results must keep to 2^-100: E(x)^2 =
// E(2x), and the table's 2^(j/64) 2^((64-j)/64) = 2.
KD_TEST(double_double_exponentials_keep_their_promise) {
    using kdloss::detail::DoubleDouble;
    auto relative = [](DoubleDouble got, long double exact) {
        return static_cast<double>(std::fabs((static_cast<long double>(got.hi) + got.lo) - exact) / exact);
    };
    const double long_double_floor = 8 * static_cast<double>(std::numeric_limits<long double>::epsilon());
    double worst_exact = 0.0, worst_precise = 0.0, worst_square = 0.0;
    const double step = kdtest::reduced ? 1.05 : 1.001;
    for (const double temperature : {0.05, 1.0, 3.0, 100.0}) {
        const kdloss::detail::ExactExponential exponential(temperature);
        for (double y = 1e-12; y < 20.0; y *= step) {
            const double x = -y * temperature;
            const long double exact = std::exp(static_cast<long double>(x) / temperature);
            worst_exact = std::max(worst_exact, relative(exponential(x), exact));
            // A low part moves the result as e^(x_lo / T) would.
            const double x_lo = x * 0x1p-60;
            worst_exact = std::max(
                worst_exact,
                relative(exponential(x, x_lo), exact * std::exp(static_cast<long double>(x_lo) / temperature)));
        }
    }
    for (double y = 1e-12; y < 300.0; y *= step) {
        for (const double x : {-y, y < 20.0 ? y : -y}) {
            const DoubleDouble got = kdloss::detail::precise_exponential(x);
            if (std::fabs(x) < 20.0)
                worst_precise = std::max(worst_precise, relative(got, std::exp(static_cast<long double>(x))));
            const DoubleDouble square = got * got, doubled = kdloss::detail::precise_exponential(2 * x);
            worst_square = std::max(worst_square, std::fabs((square - doubled).value()) / doubled.hi);
        }
    }
    for (int j = 1; j < 64; ++j) {
        const DoubleDouble product = kdloss::detail::exp2_sixty_fourths[j] * kdloss::detail::exp2_sixty_fourths[64 - j];
        KD_CHECK(std::fabs((product - DoubleDouble{2.0, 0.0}).value()) <= 0x1p-102);
    }
    // A row's sum on Packs (ExactExponential::add), -inf adding 0, against long double.
    for (const double temperature : {0.05, 1.0, 3.0}) {
        const kdloss::detail::ExactExponential exponential(temperature);
        std::vector<double> logits;
        for (int c = 0; c < 1000; ++c)
            logits.push_back(c % 97 == 5 ? -std::numeric_limits<double>::infinity() : std::sin(c * 12.9898) * 4.0);
        while (logits.size() % lanes) logits.push_back(-std::numeric_limits<double>::infinity());
        const double max = 4.0;
        kdloss::detail::ExactExponential::Sum sum{};
        long double exact = 0;
        for (std::size_t c = 0; c < logits.size(); c += lanes) {
            exponential.add(Pack<double>::load(logits.data() + c), max, sum);
            for (std::size_t i = c; i < c + lanes; ++i)
                exact += std::exp((static_cast<long double>(logits[i]) - max) / temperature);
        }
        worst_exact = std::max(worst_exact, relative(sum.value(), exact));
    }
    KD_CHECK(worst_exact <= 0x1p-57);
    KD_CHECK(worst_precise <= std::max(0x1p-100, long_double_floor));
    KD_CHECK(worst_square <= 0x1p-99);
    std::printf(
        "ExactExponential: %.1e relative; precise_exponential: %.1e against long double, %.1e in E(x)^2 = E(2x)\n",
        worst_exact, worst_precise, worst_square);
}

}  // namespace test_simd_math
