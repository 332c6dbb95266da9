// The soft term's divergences through the C++ API: reverse KL against a long-double evaluation of its own
// formula (KL(q || p) and its gradient q (log q - log p - KL) T, per row), in float and double, short rows and
// long; the parameter's parsing and its messages, as the Python front ends give them.

#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kdtest.hpp"

namespace test_divergences {

using kdloss::DistillationLoss;
using kdloss::Divergence;

// Mean over rows of T^2 KL(q || p) and its gradient, in long double.
long double reverse_kl(const std::vector<double>& s, const std::vector<double>& t, std::size_t rows,
                       std::size_t classes, double temperature, std::vector<long double>& gradient) {
    const long double T = temperature;
    long double total = 0;
    gradient.assign(rows * classes, 0);
    for (std::size_t r = 0; r < rows; ++r) {
        auto log_softmax = [&](const std::vector<double>& x) {
            long double max = -INFINITY, sum = 0;
            for (std::size_t c = 0; c < classes; ++c) max = std::max(max, x[r * classes + c] / T);
            for (std::size_t c = 0; c < classes; ++c) sum += std::exp(x[r * classes + c] / T - max);
            std::vector<long double> out(classes);
            for (std::size_t c = 0; c < classes; ++c) out[c] = x[r * classes + c] / T - max - std::log(sum);
            return out;
        };
        const std::vector<long double> lq = log_softmax(s), lp = log_softmax(t);
        long double kl = 0;
        for (std::size_t c = 0; c < classes; ++c) kl += std::exp(lq[c]) * (lq[c] - lp[c]);
        total += T * T * kl;
        for (std::size_t c = 0; c < classes; ++c)
            gradient[r * classes + c] = T * std::exp(lq[c]) * (lq[c] - lp[c] - kl) / static_cast<long double>(rows);
    }
    return total / static_cast<long double>(rows);
}

template <class T>
bool reverse_kl_agrees(std::size_t rows, std::size_t classes, double temperature, double tolerance) {
    std::mt19937_64 rng(classes);
    std::normal_distribution<double> normal(0.0, 3.0);
    std::vector<double> s(rows * classes), t(rows * classes);
    for (double& x : s) x = static_cast<double>(static_cast<T>(normal(rng)));
    for (double& x : t) x = static_cast<double>(static_cast<T>(normal(rng)));
    std::vector<long double> expected_gradient;
    const long double expected = reverse_kl(s, t, rows, classes, temperature, expected_gradient);

    const std::vector<T> student(s.begin(), s.end()), teacher(t.begin(), t.end());
    std::vector<T> gradient(rows * classes);
    const DistillationLoss<T> kd(temperature, 0.3, kdloss::Reduction::mean, -100, 1, Divergence::reverse_kl);
    const double loss = kd.loss_and_gradient({student.data(), rows, classes}, {teacher.data(), rows, classes}, {},
                                             {gradient.data(), rows, classes});
    long double largest = 0, error = 0;
    for (std::size_t i = 0; i < gradient.size(); ++i) {
        largest = std::max(largest, std::abs(expected_gradient[i]));
        error = std::max(error, std::abs(static_cast<long double>(gradient[i]) - expected_gradient[i]));
    }
    bool ok = KD_CHECK_CLOSE(loss, static_cast<double>(expected), tolerance, 0.0);
    ok = KD_CHECK(error <= tolerance * largest) && ok;
    return ok;
}

KD_TEST(reverse_kl_matches_its_formula) {
    for (std::size_t classes : {3, 100, 161, 5000})
        for (double temperature : {1.0, 2.5}) {
            reverse_kl_agrees<double>(17, classes, temperature, 1e-12);
            reverse_kl_agrees<float>(17, classes, temperature, 1e-5);
        }
}

KD_TEST(divergence_names_round_trip_and_unknown_ones_are_refused) {
    KD_CHECK(kdloss::parse_divergence("forward_kl") == Divergence::forward_kl);
    KD_CHECK(kdloss::parse_divergence("reverse_kl") == Divergence::reverse_kl);
    KD_CHECK_EQ(std::string(kdloss::divergence_name(Divergence::reverse_kl)), std::string("reverse_kl"));
    KD_CHECK_THROWS(std::invalid_argument, "divergence must be one of 'forward_kl', 'reverse_kl', got 'jsd!'",
                    kdloss::parse_divergence("jsd!"));
    KD_CHECK_THROWS(std::invalid_argument, "divergence must be one of 'forward_kl', 'reverse_kl', got '7'",
                    DistillationLoss<double>(3.0, 0.3, kdloss::Reduction::mean, -100, 1, static_cast<Divergence>(7)));
    KD_CHECK(DistillationLoss<float>().divergence() == Divergence::forward_kl);
}

KD_TEST(loss_parts_recombine_into_the_loss) {
    std::mt19937_64 rng(3);
    std::normal_distribution<double> normal(0.0, 3.0);
    const std::size_t rows = 9, classes = 300;
    std::vector<double> s(rows * classes), t(rows * classes), soft_rows(rows), hard_rows(rows);
    for (double& x : s) x = normal(rng);
    for (double& x : t) x = normal(rng);
    std::vector<std::int64_t> labels(rows, 5);
    labels[2] = -100;
    for (Divergence divergence : {Divergence::forward_kl, Divergence::reverse_kl}) {
        const DistillationLoss<double> kd(2.0, 0.3, kdloss::Reduction::mean, -100, 1, divergence);
        const kdloss::ClassIndices indices{labels.data(), rows};
        const kdloss::LossParts parts = kd.loss_parts({s.data(), rows, classes}, {t.data(), rows, classes}, indices,
                                                      soft_rows.data(), hard_rows.data());
        const double loss = kd.compute_loss({s.data(), rows, classes}, {t.data(), rows, classes}, indices);
        KD_CHECK_CLOSE(loss, 0.3 * parts.hard + 0.7 * parts.soft, 1e-14, 0.0);
        KD_CHECK(soft_rows[2] == 0.0 && hard_rows[2] == 0.0);  // the ignored row
        const kdloss::LossParts unlabelled = kd.loss_parts({s.data(), rows, classes}, {t.data(), rows, classes});
        KD_CHECK_EQ(unlabelled.hard, 0.0);
        KD_CHECK_CLOSE(unlabelled.soft, kd.compute_loss({s.data(), rows, classes}, {t.data(), rows, classes}), 1e-15,
                       0.0);
    }
}

}  // namespace test_divergences
