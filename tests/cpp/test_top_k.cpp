// kdloss::top_k against an independent reference: the row's (logit, index) pairs sorted with std::sort by
// decreasing logit and then increasing index, and the log-softmax in long double. Indices must agree exactly,
// ties and -inf entries included; log-probabilities to a few roundings of T.

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

namespace test_top_k {

using std::invalid_argument;

// rows x cols logits, row i at data[i * stride].
template <class T>
struct Logits {
    std::size_t rows = 0, cols = 0, stride = 0;
    std::vector<T> data;

    Logits(std::size_t rows_, std::size_t cols_, std::size_t stride_ = 0)
        : rows(rows_), cols(cols_), stride(stride_ == 0 ? cols_ : stride_), data(rows_ * stride + cols_) {}
    T* row(std::size_t i) { return data.data() + i * stride; }
    kdloss::MatrixView<const T> view() const { return {data.data(), rows, cols, static_cast<std::ptrdiff_t>(stride)}; }
};

template <class T>
Logits<T> random_logits(std::mt19937_64& gen, std::size_t rows, std::size_t cols, double spread,
                        std::size_t stride = 0) {
    Logits<T> logits(rows, cols, stride);
    std::normal_distribution<double> normal(0.0, spread);
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t c = 0; c < cols; ++c) logits.row(i)[c] = static_cast<T>(normal(gen));
    return logits;
}

struct Entry {
    long double value;
    std::int32_t index;
};

// The reference cache of one row: its k best entries and their log-probabilities.
std::vector<Entry> reference_row(const std::vector<long double>& x, std::size_t k, long double temperature,
                                 std::vector<long double>& logprobs) {
    std::vector<Entry> entries;
    for (std::size_t c = 0; c < x.size(); ++c) entries.push_back({x[c], static_cast<std::int32_t>(c)});
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        if (a.value != b.value) return a.value > b.value;
        return a.index < b.index;
    });
    entries.resize(k);
    const long double max = *std::max_element(x.begin(), x.end());
    long double sum = 0;
    for (const long double v : x) sum += std::exp((v - max) / temperature);
    logprobs.clear();
    for (const Entry& e : entries) logprobs.push_back((e.value - max) / temperature - std::log(sum));
    return entries;
}

template <class T>
struct Cache {
    std::size_t rows, slots, stride;
    std::vector<std::int32_t> indices;
    std::vector<T> logprobs;

    Cache(std::size_t rows_, std::size_t slots_, std::size_t stride_ = 0)
        : rows(rows_),
          slots(slots_),
          stride(stride_ == 0 ? slots_ : stride_),
          indices(rows_ * stride + slots_, -7),
          logprobs(rows_ * stride + slots_, T(7)) {}
    kdloss::MatrixView<std::int32_t> index_view() {
        return {indices.data(), rows, slots, static_cast<std::ptrdiff_t>(stride)};
    }
    kdloss::MatrixView<T> logprob_view() { return {logprobs.data(), rows, slots, static_cast<std::ptrdiff_t>(stride)}; }
    std::int32_t index(std::size_t i, std::size_t j) const { return indices[i * stride + j]; }
    T logprob(std::size_t i, std::size_t j) const { return logprobs[i * stride + j]; }
};

template <class T>
Cache<T> build(const Logits<T>& logits, std::size_t k, double temperature, std::size_t threads = 1,
               std::size_t out_stride = 0) {
    Cache<T> cache(logits.rows, k, out_stride);
    kdloss::top_k<T>(logits.view(), k, temperature, cache.index_view(), cache.logprob_view(), threads);
    return cache;
}

// Log-probabilities within this of the reference: log Z is a sum of exponentials each within about an ulp
// of T, and the result is rounded to T once.
template <class T>
constexpr long double logprob_rtol = std::is_same_v<T, float> ? 4e-7L : 1e-14L;
template <class T>
constexpr long double logprob_atol = std::is_same_v<T, float> ? 4e-7L : 1e-14L;

template <class T>
bool agrees(const Logits<T>& logits, std::size_t k, double temperature, const Cache<T>& cache) {
    bool ok = true;
    std::vector<long double> x, expected;
    for (std::size_t i = 0; i < logits.rows; ++i) {
        x.assign(logits.data.begin() + static_cast<std::ptrdiff_t>(i * logits.stride),
                 logits.data.begin() + static_cast<std::ptrdiff_t>(i * logits.stride + logits.cols));
        const std::vector<Entry> best = reference_row(x, k, temperature, expected);
        for (std::size_t j = 0; j < k; ++j) {
            ok &= KD_CHECK_EQ(cache.index(i, j), best[j].index);
            ok &= KD_CHECK_CLOSE(cache.logprob(i, j), expected[j], logprob_rtol<T>, logprob_atol<T>);
        }
        if (!ok) {
            std::fprintf(stderr, "  row %zu of %zu x %zu, k = %zu, T = %g\n", i, logits.rows, logits.cols, k,
                         temperature);
            return false;
        }
    }
    return ok;
}

template <class T>
void random_rows_agree() {
    std::mt19937_64 gen(17);
    const std::size_t shapes[][2] = {{1, 1}, {3, 2}, {4, 15}, {4, 16}, {4, 17}, {5, 100}, {3, 1000}, {2, 40000}};
    for (const auto& shape : shapes) {
        const std::size_t cols = shape[1];
        for (const std::size_t k : {std::size_t{1}, std::size_t{2}, std::size_t{7}, std::size_t{64}, cols / 2, cols}) {
            if (k < 1 || k > cols) continue;
            for (const double temperature : {0.5, 1.0, 3.0}) {
                const Logits<T> logits = random_logits<T>(gen, shape[0], cols, 4.0);
                agrees(logits, k, temperature, build(logits, k, temperature));
            }
        }
    }
}

KD_TEST(top_k_matches_the_reference_float) { random_rows_agree<float>(); }
KD_TEST(top_k_matches_the_reference_double) { random_rows_agree<double>(); }

// Logits of a few distinct values: most of the k largest are ties, broken by the lower index.
template <class T>
void ties_go_to_the_lower_index() {
    std::mt19937_64 gen(5);
    std::uniform_int_distribution<int> values(-3, 3);
    for (const std::size_t cols : {std::size_t{5}, std::size_t{33}, std::size_t{1000}, std::size_t{5000}}) {
        Logits<T> logits(6, cols);
        for (std::size_t i = 0; i < logits.rows; ++i)
            for (std::size_t c = 0; c < cols; ++c) logits.row(i)[c] = static_cast<T>(values(gen));
        for (std::size_t c = 0; c < cols; ++c) logits.row(5)[c] = T(1.5);  // all equal
        for (const std::size_t k : {std::size_t{1}, std::size_t{3}, cols / 3 + 1, cols})
            agrees(logits, k, 2.0, build(logits, k, 2.0));
    }
}

KD_TEST(top_k_breaks_ties_by_the_lower_index) {
    ties_go_to_the_lower_index<float>();
    ties_go_to_the_lower_index<double>();
}

// -inf logits are masked classes: listed after every finite one, lower index first, with log-probability -inf.
template <class T>
void masked_classes_come_last() {
    std::mt19937_64 gen(9);
    const T minus_inf = -std::numeric_limits<T>::infinity();
    for (const std::size_t cols : {std::size_t{4}, std::size_t{40}, std::size_t{3000}}) {
        Logits<T> logits = random_logits<T>(gen, 4, cols, 2.0);
        std::bernoulli_distribution masked(0.7);
        for (std::size_t c = 0; c < cols; ++c) {
            if ((masked(gen) || c == 1) && c != 0) logits.row(0)[c] = minus_inf;  // most, not all, masked
            if (c != cols / 2) logits.row(1)[c] = minus_inf;                      // one finite logit
            if (c % 2 == 0) logits.row(2)[c] = minus_inf;
        }
        for (const std::size_t k : {std::size_t{1}, std::size_t{3}, cols}) {
            const Cache<T> cache = build(logits, k, 1.5);
            agrees(logits, k, 1.5, cache);
            // The one finite logit of row 1 has all of the mass.
            KD_CHECK_EQ(cache.index(1, 0), static_cast<std::int32_t>(cols / 2));
            KD_CHECK_EQ(cache.logprob(1, 0), T(0));
            for (std::size_t j = 1; j < k; ++j) KD_CHECK_EQ(cache.logprob(1, j), minus_inf);
        }
    }
}

KD_TEST(top_k_lists_masked_classes_last_as_empty_slots) {
    masked_classes_come_last<float>();
    masked_classes_come_last<double>();
}

KD_TEST(top_k_of_one_class_is_that_class_with_probability_one) {
    const Logits<float> logits = [] {
        Logits<float> l(3, 1);
        l.row(0)[0] = -5.0f;
        l.row(1)[0] = 1e30f;
        l.row(2)[0] = 0.0f;
        return l;
    }();
    const Cache<float> cache = build(logits, 1, 0.01);
    for (std::size_t i = 0; i < 3; ++i) {
        KD_CHECK_EQ(cache.index(i, 0), 0);
        KD_CHECK_EQ(cache.logprob(i, 0), 0.0f);
    }
}

// k = C lists every class, so the probabilities add up to 1 (and the tail is empty).
template <class T>
void k_equal_to_c_lists_the_whole_distribution() {
    std::mt19937_64 gen(3);
    for (const std::size_t cols : {std::size_t{7}, std::size_t{300}, std::size_t{4100}}) {
        const Logits<T> logits = random_logits<T>(gen, 3, cols, 5.0);
        const Cache<T> cache = build(logits, cols, 2.0);
        agrees(logits, cols, 2.0, cache);
        constexpr long double sum_rtol = std::is_same_v<T, float> ? 1e-5L : 1e-13L;
        for (std::size_t i = 0; i < 3; ++i) {
            long double total = 0;
            for (std::size_t j = 0; j < cols; ++j) total += std::exp(static_cast<long double>(cache.logprob(i, j)));
            KD_CHECK_CLOSE(total, 1.0L, sum_rtol, 0.0L);
        }
    }
}

KD_TEST(top_k_with_k_equal_to_c_lists_the_whole_distribution) {
    k_equal_to_c_lists_the_whole_distribution<float>();
    k_equal_to_c_lists_the_whole_distribution<double>();
}

// A confident row: the best class's log-probability, -log(1 + tiny), keeps its relative precision, which a
// float sum that included the maximum's 1 would lose.
KD_TEST(top_k_keeps_a_confident_rows_tiny_log_probability) {
    for (const std::size_t cols : {std::size_t{20}, std::size_t{32000}}) {
        Logits<float> logits(1, cols);
        for (std::size_t c = 0; c < cols; ++c) logits.row(0)[c] = c == 3 ? 0.0f : -25.0f - 0.001f * c;
        const Cache<float> cache = build(logits, 2, 1.0);
        long double rest = 0;
        for (std::size_t c = 0; c < cols; ++c)
            if (c != 3) rest += std::exp(static_cast<long double>(logits.row(0)[c]));
        KD_CHECK_EQ(cache.index(0, 0), 3);
        KD_CHECK_CLOSE(cache.logprob(0, 0), -std::log1p(rest), 1e-5L, 0.0L);
    }
}

// Rows a stride apart (a slice of a wider batch) in, and outputs a stride apart out.
KD_TEST(top_k_reads_and_writes_strided_rows) {
    std::mt19937_64 gen(11);
    const Logits<float> logits = random_logits<float>(gen, 9, 700, 3.0, 1000);
    const Cache<float> cache = build(logits, 10, 2.0, 1, 13);
    agrees(logits, 10, 2.0, cache);
    // The gaps between output rows are untouched.
    for (std::size_t i = 0; i + 1 < cache.rows; ++i)
        for (std::size_t j = cache.slots; j < cache.stride; ++j) {
            KD_CHECK_EQ(cache.indices[i * cache.stride + j], -7);
            KD_CHECK_EQ(cache.logprobs[i * cache.stride + j], 7.0f);
        }
}

KD_TEST(top_k_holds_at_the_temperature_limits) {
    std::mt19937_64 gen(21);
    const Logits<float> single = random_logits<float>(gen, 3, 500, 3.0);
    const Logits<double> twice = random_logits<double>(gen, 3, 500, 3.0);
    for (const double temperature : {kdloss::min_temperature, 1e-3, kdloss::max_temperature}) {
        agrees(single, 20, temperature, build(single, 20, temperature));
        agrees(twice, 20, temperature, build(twice, 20, temperature));
    }
}

template <class T>
void same_bits_whatever_the_thread_count() {
    std::mt19937_64 gen(23);
    for (const std::size_t cols : {std::size_t{100}, std::size_t{5000}}) {
        const Logits<T> logits = random_logits<T>(gen, 600000 / cols, cols, 3.0);
        const Cache<T> one = build(logits, 32, 2.0, 1);
        for (const std::size_t threads : {std::size_t{2}, std::size_t{3}, std::size_t{0}}) {
            const Cache<T> many = build(logits, 32, 2.0, threads);
            KD_CHECK(many.indices == one.indices);
            KD_CHECK(std::equal(one.logprobs.begin(), one.logprobs.end(), many.logprobs.begin(),
                                [](T a, T b) { return std::memcmp(&a, &b, sizeof a) == 0; }));
        }
    }
}

KD_TEST(top_k_gives_the_same_bits_whatever_the_thread_count) {
    same_bits_whatever_the_thread_count<float>();
    same_bits_whatever_the_thread_count<double>();
}

KD_TEST(top_k_rejects_bad_arguments_before_writing) {
    std::mt19937_64 gen(1);
    const Logits<float> logits = random_logits<float>(gen, 4, 10, 1.0);
    Cache<float> cache(4, 3);
    auto call = [&](std::size_t k, double temperature, std::size_t threads = 1) {
        kdloss::top_k<float>(logits.view(), k, temperature, cache.index_view(), cache.logprob_view(), threads);
    };
    KD_CHECK_THROWS(invalid_argument, "k must be an integer in [1, C] (C = 10), got 0", call(0, 2.0));
    KD_CHECK_THROWS(invalid_argument, "k must be an integer in [1, C] (C = 10), got 11", call(11, 2.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0",
                    call(3, 0.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got nan",
                    call(3, std::nan("")));
    KD_CHECK_THROWS(invalid_argument, "num_threads must be at most 4096, got 4097", call(3, 2.0, 4097));
    KD_CHECK_THROWS(invalid_argument, "indices must have shape (4, 4), got (4, 3)", call(4, 2.0));
    Cache<float> short_logprobs(4, 2);
    KD_CHECK_THROWS(invalid_argument, "logprobs must have shape (4, 3), got (4, 2)",
                    kdloss::top_k<float>(logits.view(), 3, 2.0, cache.index_view(), short_logprobs.logprob_view()));
    KD_CHECK_THROWS(invalid_argument, "teacher_logits must have at least one class, got shape (4, 0)",
                    kdloss::top_k<float>({logits.data.data(), 4, 0}, 1, 2.0, cache.index_view(), cache.logprob_view()));
    // Writing over the logits is refused.
    std::vector<float> shared(200);
    KD_CHECK_THROWS(
        invalid_argument, "indices and logprobs must not share memory with teacher_logits or each other",
        kdloss::top_k<float>({shared.data(), 4, 10}, 3, 2.0, cache.index_view(), {shared.data() + 30, 4, 3}));
    for (const std::int32_t index : cache.indices) KD_CHECK_EQ(index, -7);
    for (const float logprob : cache.logprobs) KD_CHECK_EQ(logprob, 7.0f);
}

// A row without a softmax is named, with its first bad class; rows are counted from 0, named as Python's tuples.
template <class T>
void rows_without_a_softmax_are_named() {
    std::mt19937_64 gen(2);
    Logits<T> logits = random_logits<T>(gen, 40, 50, 1.0);
    auto message = [&]() -> std::string {
        Cache<T> cache(logits.rows, 5);
        try {
            kdloss::top_k<T>(logits.view(), 5, 2.0, cache.index_view(), cache.logprob_view(), 2);
        } catch (const invalid_argument& error) {
            return error.what();
        }
        return "no error";
    };
    logits.row(30)[7] = std::numeric_limits<T>::quiet_NaN();
    logits.row(30)[9] = std::numeric_limits<T>::infinity();
    logits.row(35)[0] = std::numeric_limits<T>::infinity();
    KD_CHECK_EQ(message(), std::string("teacher_logits must be finite or -inf, got nan at class 7 of row (30,)"));
    logits.row(30)[7] = 0;
    KD_CHECK_EQ(message(), std::string("teacher_logits must be finite or -inf, got inf at class 9 of row (30,)"));
    logits.row(30)[9] = 0;
    KD_CHECK_EQ(message(), std::string("teacher_logits must be finite or -inf, got inf at class 0 of row (35,)"));
    logits.row(35)[0] = 0;
    for (std::size_t c = 0; c < logits.cols; ++c) logits.row(2)[c] = -std::numeric_limits<T>::infinity();
    KD_CHECK_EQ(message(),
                std::string("teacher_logits must have a finite logit in every row (its softmax needs one), got only "
                            "-inf in row (2,)"));
    // A NaN in the first k logits, and in the last partial Pack.
    logits.row(2)[0] = 0;
    logits.row(3)[1] = std::numeric_limits<T>::quiet_NaN();
    KD_CHECK_EQ(message(), std::string("teacher_logits must be finite or -inf, got nan at class 1 of row (3,)"));
    logits.row(3)[1] = 0;
    logits.row(4)[49] = std::numeric_limits<T>::quiet_NaN();
    KD_CHECK_EQ(message(), std::string("teacher_logits must be finite or -inf, got nan at class 49 of row (4,)"));
}

KD_TEST(top_k_names_the_first_row_without_a_softmax) {
    rows_without_a_softmax_are_named<float>();
    rows_without_a_softmax_are_named<double>();
}

// Rows of an N-D array's flattened leading axes are named by their index there (the Python module's way).
KD_TEST(cache_messages_name_rows_as_tuples) {
    const std::size_t shape[] = {2, 30, 4};
    KD_CHECK_EQ(kdloss::detail::format_row(34), std::string("(34,)"));
    const std::size_t one_axis[] = {40};
    KD_CHECK_EQ(kdloss::detail::format_row(34, one_axis, 1), std::string("(34,)"));
    KD_CHECK_EQ(kdloss::detail::format_row(34, shape, 2), std::string("(1, 4)"));
    KD_CHECK_EQ(kdloss::detail::format_row(125, shape, 3), std::string("(1, 1, 1)"));
    KD_CHECK_EQ(kdloss::detail::format_row(0, shape, 0), std::string("()"));
    std::vector<float> logits(2 * 30 * 5, 0.0f);
    logits[(34 * 5) + 3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<std::int32_t> indices(60);
    std::vector<float> logprobs(60);
    KD_CHECK_THROWS(
        invalid_argument, "teacher_logits must be finite or -inf, got nan at class 3 of row (1, 4)",
        kdloss::detail::top_k_with<float>(kdloss::detail::top_k_rows<float>, {logits.data(), 60, 5}, 1, 1.0,
                                          {indices.data(), 60, 1}, {logprobs.data(), 60, 1}, 1, {shape, 2}));
}

KD_TEST(top_k_of_no_rows_writes_nothing) {
    const float logit = 0.0f;
    KD_CHECK_NOTHROW(kdloss::top_k<float>({&logit, 0, 5}, 2, 2.0, {nullptr, 0, 2}, {nullptr, 0, 2}));
}

}  // namespace test_top_k
