// Sparse teachers through the C++ API (kdloss/sparse_teacher.hpp): the loss and gradient against a long-double
// evaluation of the K + 1-bin KL written from its definition, for both tails, float and double, every cache
// dtype, rows shorter than a vector, short and long, with labels; a cache of every class against the dense
// teacher; the checks of bad caches, which write nothing; float16's conversion.

#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kdtest.hpp"

namespace test_sparse_teacher {

using kdloss::DistillationLoss;
using kdloss::SparseTeacherView;
using kdloss::Tail;

constexpr double minus_infinity = -std::numeric_limits<double>::infinity();

// A cache: the top k classes of random teacher logits, their log-softmax at `temperature` in long double; row 1
// lists one class fewer (an empty slot, whose index is out of range on purpose).
struct Cache {
    std::size_t rows, classes, k;
    std::vector<std::int64_t> indices;
    std::vector<double> logprobs;
};

inline Cache top_k(std::size_t rows, std::size_t classes, std::size_t k, double temperature, std::mt19937_64& rng) {
    std::normal_distribution<double> normal(0.0, 3.0);
    Cache cache{rows, classes, k, std::vector<std::int64_t>(rows * k), std::vector<double>(rows * k)};
    for (std::size_t r = 0; r < rows; ++r) {
        std::vector<double> t(classes);
        for (double& x : t) x = normal(rng);
        std::vector<std::size_t> order(classes);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return t[a] > t[b]; });
        long double sum = 0;
        for (double x : t) sum += std::exp(static_cast<long double>(x - t[order[0]]) / temperature);
        for (std::size_t j = 0; j < k; ++j) {
            cache.indices[r * k + j] = static_cast<std::int64_t>(order[j]);
            cache.logprobs[r * k + j] =
                static_cast<double>(static_cast<long double>(t[order[j]] - t[order[0]]) / temperature - std::log(sum));
        }
        if (r == 1 && k > 1) {
            cache.logprobs[r * k + k - 1] = minus_infinity;
            cache.indices[r * k + k - 1] = static_cast<std::int64_t>(classes) + 7;
        }
    }
    return cache;
}

// The mean over rows of alpha CE + (1 - alpha) T^2 D and its gradient, D the KL over the listed classes and the
// rest (bucket) or over the listed classes renormalised, in long double.
inline long double reference(const std::vector<double>& s, const Cache& cache, const std::vector<std::int64_t>& labels,
                             double temperature, double alpha, Tail tail, std::vector<long double>& gradient) {
    const std::size_t rows = cache.rows, classes = cache.classes, k = cache.k;
    const long double T = temperature, soft_weight = labels.empty() ? 1.0L : 1.0L - alpha;
    long double total = 0;
    gradient.assign(rows * classes, 0);
    for (std::size_t r = 0; r < rows; ++r) {
        const double* row = s.data() + r * classes;
        long double max = -INFINITY;
        for (std::size_t c = 0; c < classes; ++c) max = std::max<long double>(max, row[c]);
        long double z = 0, z_hard = 0;
        for (std::size_t c = 0; c < classes; ++c) {
            z += std::exp((row[c] - max) / T);
            z_hard += std::exp(row[c] - max);
        }
        std::vector<long double> q(classes), pi(classes, 0);
        std::vector<bool> listed(classes, false);
        for (std::size_t c = 0; c < classes; ++c) q[c] = std::exp((row[c] - max) / T) / z;
        long double p_sum = 0;
        std::size_t count = 0;
        for (std::size_t j = 0; j < k; ++j) {
            const double lp = cache.logprobs[r * k + j];
            if (lp == minus_infinity) continue;
            const auto c = static_cast<std::size_t>(cache.indices[r * k + j]);
            pi[c] = std::exp(static_cast<long double>(lp));
            listed[c] = true;
            p_sum += pi[c];
            ++count;
        }
        long double rho = 0;
        if (tail == Tail::renormalize) {
            for (long double& x : pi) x /= p_sum;
        } else if (count < classes) {
            rho = std::max(0.0L, 1 - p_sum);
        }
        long double unlisted = 0, divergence = 0, total_pi = rho;
        for (std::size_t c = 0; c < classes; ++c) {
            if (!listed[c]) unlisted += q[c];
            if (listed[c]) divergence += pi[c] * (std::log(pi[c]) - std::log(q[c]));
            total_pi += pi[c];
        }
        if (rho > 0) divergence += rho * (std::log(rho) - std::log(unlisted));
        total += soft_weight * T * T * divergence;
        for (std::size_t c = 0; c < classes; ++c)
            gradient[r * classes + c] =
                soft_weight *
                (listed[c] ? T * (total_pi * q[c] - pi[c]) : T * q[c] * (total_pi - (rho > 0 ? rho / unlisted : 0)));
        if (!labels.empty()) {
            const auto y = static_cast<std::size_t>(labels[r]);
            total += alpha * (std::log(z_hard) - (row[y] - max));
            for (std::size_t c = 0; c < classes; ++c)
                gradient[r * classes + c] += alpha * (std::exp(row[c] - max) / z_hard - (c == y ? 1 : 0));
        }
    }
    for (long double& g : gradient) g /= static_cast<long double>(rows);
    return total / static_cast<long double>(rows);
}

template <class LogProb>
std::vector<LogProb> logprobs_as(const std::vector<double>& values);
template <>
std::vector<double> logprobs_as(const std::vector<double>& values) {
    return values;
}
template <>
std::vector<float> logprobs_as(const std::vector<double>& values) {
    return std::vector<float>(values.begin(), values.end());
}

template <class T, class Index, class LogProb>
bool agrees(std::size_t rows, std::size_t classes, std::size_t k, Tail tail, bool labelled) {
    std::mt19937_64 rng(classes * 31 + k);
    const double temperature = 2.0, alpha = 0.4;
    const Cache cache = top_k(rows, classes, k, temperature, rng);
    std::normal_distribution<double> normal(0.0, 3.0);
    std::vector<double> s(rows * classes);
    for (double& x : s) x = static_cast<double>(static_cast<T>(normal(rng)));
    std::vector<std::int64_t> labels;
    if (labelled)
        for (std::size_t r = 0; r < rows; ++r) labels.push_back(static_cast<std::int64_t>(rng() % classes));
    const std::vector<Index> indices(cache.indices.begin(), cache.indices.end());
    const std::vector<LogProb> logprobs = logprobs_as<LogProb>(cache.logprobs);
    // The reference reads the log-probabilities as the kernel does, rounded to LogProb.
    Cache rounded = cache;
    rounded.logprobs.assign(logprobs.begin(), logprobs.end());
    std::vector<long double> expected_gradient;
    const long double expected = reference(s, rounded, labels, temperature, alpha, tail, expected_gradient);

    const std::vector<T> student(s.begin(), s.end());
    std::vector<T> gradient(rows * classes);
    const DistillationLoss<T> kd(temperature, alpha, kdloss::Reduction::mean, -100, 1, kdloss::Divergence::forward_kl,
                                 0.5, 0.1, tail);
    const SparseTeacherView teacher(indices.data(), logprobs.data(), rows, k);
    const kdloss::Labels<T> given =
        labelled ? kdloss::Labels<T>(kdloss::ClassIndices{labels.data(), rows}) : kdloss::Labels<T>{};
    const double loss =
        kd.loss_and_gradient({student.data(), rows, classes}, teacher, given, {gradient.data(), rows, classes});
    const long double tolerance = std::is_same_v<T, float> ? 1e-5L : 1e-12L;
    long double largest = 0, error = 0;
    for (std::size_t i = 0; i < gradient.size(); ++i) {
        largest = std::max(largest, std::fabs(expected_gradient[i]));
        error = std::max(error, std::fabs(gradient[i] - expected_gradient[i]));
    }
    return std::fabs(loss - expected) <= tolerance * std::fabs(expected) && error <= tolerance * largest &&
           loss == kd.compute_loss({student.data(), rows, classes}, teacher, given);
}

KD_TEST(loss_and_gradient_agree_with_the_definition) {
    for (const Tail tail : {Tail::bucket, Tail::renormalize}) {
        for (const bool labelled : {false, true}) {
            for (const std::size_t classes : {5, 40, 300, 1000}) {
                const std::size_t k = std::min<std::size_t>(classes, 9);
                KD_CHECK((agrees<double, std::int64_t, double>(6, classes, k, tail, labelled)));
                KD_CHECK((agrees<float, std::int32_t, float>(6, classes, k, tail, labelled)));
                KD_CHECK((agrees<float, std::int64_t, double>(6, classes, k, tail, labelled)));
            }
        }
    }
}

KD_TEST(a_cache_of_every_class_is_the_dense_teacher) {
    std::mt19937_64 rng(5);
    const std::size_t rows = 4, classes = 60;
    std::normal_distribution<double> normal(0.0, 2.0);
    std::vector<double> s(rows * classes), t(rows * classes), gradient(rows * classes), dense(rows * classes);
    for (double& x : s) x = normal(rng);
    for (double& x : t) x = normal(rng);
    std::vector<std::int64_t> indices(rows * classes);
    std::vector<double> logprobs(rows * classes);
    for (std::size_t r = 0; r < rows; ++r) {
        long double max = -INFINITY, sum = 0;
        for (std::size_t c = 0; c < classes; ++c) max = std::max<long double>(max, t[r * classes + c] / 1.5);
        for (std::size_t c = 0; c < classes; ++c) sum += std::exp(t[r * classes + c] / 1.5 - max);
        for (std::size_t c = 0; c < classes; ++c) {
            indices[r * classes + c] = static_cast<std::int64_t>(classes - 1 - c);  // any order
            logprobs[r * classes + c] =
                static_cast<double>(t[r * classes + classes - 1 - c] / 1.5 - max - std::log(sum));
        }
    }
    const std::vector<std::int64_t> labels = {3, 0, 59, 12};
    for (const Tail tail : {Tail::bucket, Tail::renormalize}) {
        const DistillationLoss<double> kd(1.5, 0.3, kdloss::Reduction::sum, -100, 1, kdloss::Divergence::forward_kl,
                                          0.5, 0.1, tail);
        const kdloss::ClassIndices given{labels.data(), rows};
        const double expected = kd.loss_and_gradient({s.data(), rows, classes}, {t.data(), rows, classes}, given,
                                                     {dense.data(), rows, classes});
        const double loss = kd.loss_and_gradient({s.data(), rows, classes},
                                                 SparseTeacherView(indices.data(), logprobs.data(), rows, classes),
                                                 given, {gradient.data(), rows, classes});
        KD_CHECK_CLOSE(loss, expected, 1e-12, 0.0);
        for (std::size_t i = 0; i < gradient.size(); ++i) KD_CHECK_CLOSE(gradient[i], dense[i], 0.0, 1e-12);
    }
}

KD_TEST(threads_give_bitwise_the_same_results) {
    std::mt19937_64 rng(6);
    const std::size_t rows = 48, classes = 5000, k = 16;
    const Cache cache = top_k(rows, classes, k, 3.0, rng);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> s(rows * classes), one(rows * classes), three(rows * classes);
    for (float& x : s) x = normal(rng);
    const std::vector<float> logprobs(cache.logprobs.begin(), cache.logprobs.end());
    const SparseTeacherView teacher(cache.indices.data(), logprobs.data(), rows, k);
    const double a = DistillationLoss<float>(3.0, 0.3, kdloss::Reduction::mean, -100, 1)
                         .loss_and_gradient({s.data(), rows, classes}, teacher, {}, {one.data(), rows, classes});
    const double b = DistillationLoss<float>(3.0, 0.3, kdloss::Reduction::mean, -100, 3)
                         .loss_and_gradient({s.data(), rows, classes}, teacher, {}, {three.data(), rows, classes});
    KD_CHECK_EQ(a, b);
    KD_CHECK(one == three);
}

KD_TEST(bad_caches_are_refused_naming_the_row_and_nothing_is_written) {
    std::mt19937_64 rng(7);
    const std::size_t rows = 3, classes = 50, k = 5;
    const Cache good = top_k(rows, classes, k, 1.0, rng);
    std::vector<double> s(rows * classes, 0.5);
    const DistillationLoss<double> kd(1.0);
    auto refused = [&](Cache cache, const std::string& message) {
        std::vector<double> out(rows * classes, 7.0);
        KD_CHECK_THROWS(std::invalid_argument, message,
                        kd.compute_gradient({s.data(), rows, classes},
                                            SparseTeacherView(cache.indices.data(), cache.logprobs.data(), rows, k), {},
                                            {out.data(), rows, classes}));
        KD_CHECK(std::all_of(out.begin(), out.end(), [](double x) { return x == 7.0; }));
    };
    Cache bad = good;
    bad.logprobs[1 * k + 2] = std::numeric_limits<double>::quiet_NaN();
    refused(bad, "logprobs of row (1,) hold NaN");
    bad = good;
    bad.logprobs[2 * k] = std::numeric_limits<double>::infinity();
    refused(bad, "logprobs of row (2,) hold +inf");
    bad = good;
    bad.indices[1 * k + 3] = 50;
    refused(bad, "indices of row (1,) hold 50, outside [0, 50)");
    bad = good;
    bad.indices[2 * k + 4] = bad.indices[2 * k + 1];
    refused(bad, "indices of row (2,) list class " + std::to_string(bad.indices[2 * k + 1]) + " more than once");
    bad = good;
    for (std::size_t j = 0; j < k; ++j) bad.logprobs[j] = std::log(0.25);
    refused(bad, "logprobs of row (0,) sum to probability 1.25 > 1 (+1e-6 for rounding)");
    // Other divergences need the whole teacher; a cache of other rows is no cache of these.
    const DistillationLoss<double> jsd(1.0, 0.3, kdloss::Reduction::mean, -100, 1, kdloss::Divergence::jsd);
    KD_CHECK_THROWS(std::invalid_argument,
                    "divergence 'jsd' needs the teacher's whole distribution: a sparse teacher takes divergence "
                    "'forward_kl' only",
                    jsd.compute_loss({s.data(), rows, classes},
                                     SparseTeacherView(good.indices.data(), good.logprobs.data(), rows, k)));
    // Above T = 100 its loss would lose digits to cancellation, which the dense loss's rows are computed again for
    // and a sparse teacher's are not (yet): refused.
    const DistillationLoss<double> hot(1000.0);
    KD_CHECK_THROWS(std::invalid_argument,
                    "temperature must be at most 100 with a sparse teacher (where kdloss is accurate), got 1000",
                    hot.compute_loss({s.data(), rows, classes},
                                     SparseTeacherView(good.indices.data(), good.logprobs.data(), rows, k)));
    KD_CHECK_THROWS(
        std::invalid_argument, "a sparse teacher must have a row for each row of student_logits (3), got 2",
        kd.compute_loss({s.data(), rows, classes}, SparseTeacherView(good.indices.data(), good.logprobs.data(), 2, k)));
    KD_CHECK_THROWS(std::invalid_argument, "tail must be one of 'bucket', 'renormalize', got 'top'",
                    kdloss::parse_tail("top"));
}

KD_TEST(rows_are_named_by_the_leading_shape_given) {
    SparseTeacherView view;
    KD_CHECK_EQ(view.row_name(7), std::string("(7,)"));
    const std::size_t shape[] = {2, 3};
    view.set_leading_shape(shape, 2);
    KD_CHECK_EQ(view.row_name(5), std::string("(1, 2)"));
    const std::size_t one[] = {4};
    view.set_leading_shape(one, 1);
    KD_CHECK_EQ(view.row_name(3), std::string("(3,)"));
}

KD_TEST(float16_reads_exactly) {
    const auto half = [](std::uint16_t bits) { return kdloss::to_double(kdloss::Float16{bits}); };
    KD_CHECK_EQ(half(0x3c00), 1.0);
    KD_CHECK_EQ(half(0xc000), -2.0);
    KD_CHECK_EQ(half(0x3555), 0.333251953125);
    KD_CHECK_EQ(half(0x0001), std::ldexp(1.0, -24));  // the smallest subnormal
    KD_CHECK_EQ(half(0x03ff), std::ldexp(1023.0, -24));
    KD_CHECK_EQ(half(0x7bff), 65504.0);
    KD_CHECK_EQ(half(0xfc00), minus_infinity);
    KD_CHECK(std::isnan(half(0x7e00)));
    KD_CHECK_EQ(half(0x8000), 0.0);
    KD_CHECK(std::signbit(half(0x8000)));
}

}  // namespace test_sparse_teacher
