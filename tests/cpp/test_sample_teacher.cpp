// kdloss::sample_teacher: the cache's structure (distinct classes, counts that add up to num_samples, their
// order, the empty slots), that the draws follow softmax(t / T) (chi-square statistics against a long-double
// softmax, under bounds that a correct sampler exceeds with probability below 1e-6, for fixed seeds), that
// masked classes are never drawn, and that a row's draws depend on the seed and its index alone.

#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kdtest.hpp"

namespace test_sample_teacher {

using std::invalid_argument;

template <class T>
struct Sampled {
    std::size_t rows, slots;
    std::vector<std::int32_t> indices;
    std::vector<T> logprobs;

    std::int32_t index(std::size_t i, std::size_t j) const { return indices[i * slots + j]; }
    T logprob(std::size_t i, std::size_t j) const { return logprobs[i * slots + j]; }
};

template <class T>
Sampled<T> sample(const std::vector<T>& logits, std::size_t rows, std::size_t cols, std::size_t num_samples,
                  double temperature, std::uint64_t seed, std::size_t threads = 1) {
    const std::size_t slots = kdloss::sample_slots(num_samples, cols);
    Sampled<T> out{rows, slots, std::vector<std::int32_t>(rows * slots), std::vector<T>(rows * slots)};
    kdloss::sample_teacher<T>({logits.data(), rows, cols}, num_samples, temperature, seed,
                              {out.indices.data(), rows, slots}, {out.logprobs.data(), rows, slots}, threads);
    return out;
}

template <class T>
std::vector<T> random_logits(std::mt19937_64& gen, std::size_t count, double spread) {
    std::normal_distribution<double> normal(0.0, spread);
    std::vector<T> logits(count);
    for (T& v : logits) v = static_cast<T>(normal(gen));
    return logits;
}

// Each row's counts by class (count = num_samples e^logprob, checked to be an integer), after checking the
// row's structure.
template <class T>
std::vector<std::vector<std::uint64_t>> counts_of(const Sampled<T>& s, std::size_t cols, std::size_t num_samples) {
    std::vector<std::vector<std::uint64_t>> counts(s.rows, std::vector<std::uint64_t>(cols, 0));
    for (std::size_t i = 0; i < s.rows; ++i) {
        std::uint64_t total = 0, previous = std::numeric_limits<std::uint64_t>::max();
        std::size_t listed = 0;
        for (std::size_t j = 0; j < s.slots; ++j) {
            const std::int32_t index = s.index(i, j);
            KD_CHECK(index >= 0 && static_cast<std::size_t>(index) < cols);
            if (s.logprob(i, j) == -std::numeric_limits<T>::infinity()) {
                // An empty slot repeats the index listed last.
                KD_CHECK(listed > 0);
                if (listed > 0) KD_CHECK_EQ(index, s.index(i, listed - 1));
                continue;
            }
            KD_CHECK_EQ(listed, j);  // empty slots only after the listed ones
            ++listed;
            const long double weight = std::exp(static_cast<long double>(s.logprob(i, j))) * num_samples;
            const auto count = static_cast<std::uint64_t>(std::llround(weight));
            KD_CHECK(count >= 1);
            KD_CHECK_EQ(s.logprob(i, j), static_cast<T>(std::log(static_cast<double>(count) / num_samples)));
            KD_CHECK_EQ(counts[i][static_cast<std::size_t>(index)], std::uint64_t{0});  // listed once
            // By decreasing count, ties to the lower index.
            KD_CHECK(count < previous || (count == previous && index > s.index(i, j - 1)));
            previous = count;
            counts[i][static_cast<std::size_t>(index)] = count;
            total += count;
        }
        KD_CHECK_EQ(total, static_cast<std::uint64_t>(num_samples));
    }
    return counts;
}

// softmax(x / T) in long double.
template <class T>
std::vector<long double> softmax(const T* x, std::size_t cols, double temperature) {
    long double max = -std::numeric_limits<long double>::infinity();
    for (std::size_t c = 0; c < cols; ++c) max = std::max<long double>(max, x[c]);
    std::vector<long double> p(cols);
    long double sum = 0;
    for (std::size_t c = 0; c < cols; ++c) sum += p[c] = std::exp((static_cast<long double>(x[c]) - max) / temperature);
    for (long double& v : p) v /= sum;
    return p;
}

// Pearson's chi-square of observed counts against expected probabilities, over the classes expected at least
// 5 times (the others pooled), and its degrees of freedom.
struct ChiSquare {
    long double statistic = 0;
    std::size_t degrees = 0;
};

ChiSquare chi_square(const std::vector<std::uint64_t>& observed, const std::vector<long double>& p,
                     std::uint64_t draws) {
    ChiSquare result;
    long double pooled_expected = 0, pooled_observed = 0;
    std::size_t bins = 0;
    for (std::size_t c = 0; c < p.size(); ++c) {
        const long double expected = p[c] * draws;
        if (expected < 5) {
            pooled_expected += expected;
            pooled_observed += observed[c];
            continue;
        }
        result.statistic += (observed[c] - expected) * (observed[c] - expected) / expected;
        ++bins;
    }
    if (pooled_expected >= 5) {
        result.statistic += (pooled_observed - pooled_expected) * (pooled_observed - pooled_expected) / pooled_expected;
        ++bins;
    }
    result.degrees = bins - 1;
    return result;
}

// A bound that a chi-square variable of `degrees` degrees of freedom exceeds with probability below 1e-6
// (Wilson-Hilferty, z = 4.9; generous for few degrees).
long double chi_square_bound(std::size_t degrees) {
    const long double k = static_cast<long double>(degrees);
    const long double h = 2.0L / (9.0L * k);
    return k * std::pow(1.0L - h + 4.9L * std::sqrt(h), 3.0L) + 10.0L;
}

template <class T>
void structure_holds() {
    std::mt19937_64 gen(7);
    for (const std::size_t cols :
         {std::size_t{1}, std::size_t{3}, std::size_t{17}, std::size_t{64}, std::size_t{1000}, std::size_t{5000}})
        for (const std::size_t num_samples : {std::size_t{1}, std::size_t{5}, std::size_t{64}, std::size_t{3000}})
            for (const double spread : {0.1, 3.0, 30.0}) {
                const std::size_t rows = 5;
                const std::vector<T> logits = random_logits<T>(gen, rows * cols, spread);
                const Sampled<T> s = sample(logits, rows, cols, num_samples, 2.0, 42);
                KD_CHECK_EQ(s.slots, std::min(num_samples, cols));
                counts_of(s, cols, num_samples);
            }
}

KD_TEST(sample_teacher_lists_distinct_classes_by_count_float) { structure_holds<float>(); }
KD_TEST(sample_teacher_lists_distinct_classes_by_count_double) { structure_holds<double>(); }

template <class T>
void draws_follow_the_softmax() {
    std::mt19937_64 gen(99);
    // One long row, many times: the counts pooled over rows against the softmax.
    for (const std::size_t cols : {std::size_t{2}, std::size_t{10}, std::size_t{300}, std::size_t{20000}})
        for (const double temperature : {0.7, 2.0}) {
            const std::size_t rows = 64, num_samples = 4096;
            const std::vector<T> row = random_logits<T>(gen, cols, 2.0);
            std::vector<T> logits;
            for (std::size_t i = 0; i < rows; ++i) logits.insert(logits.end(), row.begin(), row.end());
            const Sampled<T> s = sample(logits, rows, cols, num_samples, temperature, 1234 + cols);
            const auto counts = counts_of(s, cols, num_samples);
            std::vector<std::uint64_t> pooled(cols, 0);
            for (const auto& row_counts : counts)
                for (std::size_t c = 0; c < cols; ++c) pooled[c] += row_counts[c];
            const ChiSquare test = chi_square(pooled, softmax(row.data(), cols, temperature), rows * num_samples);
            KD_CHECK(test.degrees >= 1);
            if (!KD_CHECK(test.statistic < chi_square_bound(test.degrees)))
                std::fprintf(stderr, "  chi-square %Lg on %zu degrees, C = %zu, T = %g\n", test.statistic, test.degrees,
                             cols, temperature);
        }
}

KD_TEST(sample_teacher_draws_follow_the_softmax) {
    draws_follow_the_softmax<float>();
    draws_follow_the_softmax<double>();
}

// The rows' streams are independent of each other: each row's counts of two equally likely classes, under the
// same seed, are binomial; their spread over many rows is that of independent rows.
KD_TEST(sample_teacher_rows_draw_independently) {
    const std::size_t rows = 20000, num_samples = 16;
    const std::vector<float> logits(rows * 2, 0.0f);
    const Sampled<float> s = sample(logits, rows, 2, num_samples, 1.0, 5);
    const auto counts = counts_of(s, 2, num_samples);
    // The count of class 0 in a row: Binomial(16, 1/2), checked bin by bin over the rows.
    std::vector<std::uint64_t> histogram(num_samples + 1, 0);
    for (const auto& row : counts) ++histogram[row[0]];
    std::vector<long double> p(num_samples + 1);
    for (std::size_t j = 0; j <= num_samples; ++j)
        p[j] = std::exp(std::lgamma(17.0L) - std::lgamma(j + 1.0L) - std::lgamma(17.0L - j)) / 65536.0L;
    const ChiSquare test = chi_square(histogram, p, rows);
    KD_CHECK(test.statistic < chi_square_bound(test.degrees));
    // And neighbouring rows do not agree more than chance says (1 in 17 or so for two binomials).
    std::size_t same = 0;
    for (std::size_t i = 0; i + 1 < rows; ++i) same += counts[i][0] == counts[i + 1][0];
    long double agree = 0;
    for (const long double q : p) agree += q * q;
    const long double expected = agree * (rows - 1);
    KD_CHECK(std::fabs(same - expected) < 5 * std::sqrt(expected));
}

template <class T>
void masked_classes_are_never_drawn() {
    std::mt19937_64 gen(13);
    const T minus_inf = -std::numeric_limits<T>::infinity();
    for (const std::size_t cols : {std::size_t{5}, std::size_t{100}, std::size_t{3000}}) {
        const std::size_t rows = 50, num_samples = 2000;
        std::vector<T> logits = random_logits<T>(gen, rows * cols, 3.0);
        std::bernoulli_distribution masked(0.8);
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t c = 1; c < cols; ++c)  // class 0 stays
                if (masked(gen)) logits[i * cols + c] = minus_inf;
        // And classes whose probability is within float's range of 0, beside one that holds the mass.
        for (std::size_t c = 0; c < cols; ++c) logits[c] = c == cols / 2 ? T(0) : T(-200);
        const Sampled<T> s = sample(logits, rows, cols, num_samples, 1.0, 77);
        const auto counts = counts_of(s, cols, num_samples);
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t c = 0; c < cols; ++c)
                if (logits[i * cols + c] == minus_inf) KD_CHECK_EQ(counts[i][c], std::uint64_t{0});
        if constexpr (std::is_same_v<T, float>) {  // e^-200 is below float's range: never drawn
            KD_CHECK_EQ(counts[0][cols / 2], static_cast<std::uint64_t>(num_samples));
            KD_CHECK_EQ(s.logprob(0, 0), T(0));
        }
    }
}

KD_TEST(sample_teacher_never_draws_a_class_of_probability_zero) {
    masked_classes_are_never_drawn<float>();
    masked_classes_are_never_drawn<double>();
}

KD_TEST(sample_teacher_at_the_lowest_temperature_draws_the_maximum) {
    const std::vector<double> logits = {1.0, 3.0, 2.999, -1.0};
    const Sampled<double> s = sample(logits, 1, 4, 50, kdloss::min_temperature, 0);
    KD_CHECK_EQ(s.index(0, 0), 1);
    KD_CHECK_EQ(s.logprob(0, 0), 0.0);
    for (std::size_t j = 1; j < s.slots; ++j) KD_CHECK_EQ(s.logprob(0, j), -std::numeric_limits<double>::infinity());
}

template <class T>
bool same_bits(const Sampled<T>& a, const Sampled<T>& b) {
    return a.indices == b.indices && a.logprobs.size() == b.logprobs.size() &&
           std::memcmp(a.logprobs.data(), b.logprobs.data(), a.logprobs.size() * sizeof(T)) == 0;
}

template <class T>
void reproducible() {
    std::mt19937_64 gen(31);
    for (const std::size_t cols : {std::size_t{50}, std::size_t{4000}}) {
        const std::size_t rows = 800000 / cols;
        const std::vector<T> logits = random_logits<T>(gen, rows * cols, 2.0);
        const Sampled<T> one = sample(logits, rows, cols, 64, 1.5, 2024);
        for (const std::size_t threads : {std::size_t{1}, std::size_t{2}, std::size_t{3}, std::size_t{0}})
            KD_CHECK(same_bits(sample(logits, rows, cols, 64, 1.5, 2024, threads), one));
        KD_CHECK(!same_bits(sample(logits, rows, cols, 64, 1.5, 2025), one));
        // A row's draws depend on its index, not on the rows after it.
        const Sampled<T> head =
            sample(std::vector<T>(logits.begin(), logits.begin() + 10 * cols), 10, cols, 64, 1.5, 2024);
        KD_CHECK(std::equal(head.indices.begin(), head.indices.end(), one.indices.begin()));
    }
}

KD_TEST(sample_teacher_is_reproducible_whatever_the_thread_count) {
    reproducible<float>();
    reproducible<double>();
}

// SplitMix64's published outputs for seed 1234567 (Vigna's splitmix64.c): the generator is the one named.
KD_TEST(sample_teacher_generator_is_splitmix64) {
    using kdloss::detail::splitmix_gamma;
    using kdloss::detail::splitmix_mix;
    KD_CHECK_EQ(splitmix_mix(1234567u + 1 * splitmix_gamma), std::uint64_t{6457827717110365317u});
    KD_CHECK_EQ(splitmix_mix(1234567u + 2 * splitmix_gamma), std::uint64_t{3203168211198807973u});
    KD_CHECK_EQ(splitmix_mix(1234567u + 3 * splitmix_gamma), std::uint64_t{9817491932198370423u});
}

KD_TEST(sample_teacher_rejects_bad_arguments) {
    const std::vector<float> logits(40, 0.0f);
    std::vector<std::int32_t> indices(40);
    std::vector<float> logprobs(40);
    auto call = [&](std::size_t num_samples, std::size_t slots) {
        kdloss::sample_teacher<float>({logits.data(), 4, 10}, num_samples, 2.0, 0, {indices.data(), 4, slots},
                                      {logprobs.data(), 4, slots});
    };
    KD_CHECK_THROWS(invalid_argument, "num_samples must be an integer >= 1, got 0", call(0, 1));
    KD_CHECK_THROWS(invalid_argument, "indices must have shape (4, 10), got (4, 5)", call(64, 5));
    KD_CHECK_NOTHROW(call(64, 10));
    KD_CHECK_NOTHROW(call(5, 5));
    std::vector<float> bad = logits;
    bad[25] = std::numeric_limits<float>::quiet_NaN();
    KD_CHECK_THROWS(
        invalid_argument, "teacher_logits must be finite or -inf, got nan at class 5 of row (2,)",
        kdloss::sample_teacher<float>({bad.data(), 4, 10}, 3, 2.0, 0, {indices.data(), 4, 3}, {logprobs.data(), 4, 3}));
    bad[25] = -std::numeric_limits<float>::infinity();
    for (std::size_t c = 30; c < 40; ++c) bad[c] = -std::numeric_limits<float>::infinity();
    KD_CHECK_THROWS(
        invalid_argument,
        "teacher_logits must have a finite logit in every row (its softmax needs one), got only -inf in "
        "row (3,)",
        kdloss::sample_teacher<float>({bad.data(), 4, 10}, 3, 2.0, 0, {indices.data(), 4, 3}, {logprobs.data(), 4, 3}));
}

}  // namespace test_sample_teacher
