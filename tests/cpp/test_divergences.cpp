// The soft term's divergences through the C++ API: each against a long-double evaluation of its own definition,
// in float and double, short rows and long; the mixtures' ends and masks; the parameters' parsing and
// messages, as the Python front ends give them.

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

// Mean over rows of T^2 D(p, q) and its gradient, in long double, from each divergence's definition: the
// KLs directly, the mixtures through their mixture m and G = dD/dq (q taken as free), with the gradient
// T q (G - E_q[G]) of the chain rule through q = softmax(s/T).
long double reference(Divergence divergence, double beta, double skew, const std::vector<double>& s,
                      const std::vector<double>& t, std::size_t rows, std::size_t classes, double temperature,
                      std::vector<long double>& gradient) {
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
        // The mixture's weights of p and q, and the divergence's of KL(p || m) and KL(q || m).
        long double a = 0, b = 0, wp = 0, wq = 0;
        if (divergence == Divergence::jsd) a = wp = beta, b = wq = 1 - beta;
        if (divergence == Divergence::skew_forward_kl) a = skew, b = 1 - skew, wp = 1;
        if (divergence == Divergence::skew_reverse_kl) a = 1 - skew, b = skew, wq = 1;
        std::vector<long double> g(classes);
        long double d = 0, mean = 0;
        for (std::size_t c = 0; c < classes; ++c) {
            const long double p = std::exp(lp[c]), q = std::exp(lq[c]);
            if (divergence == Divergence::forward_kl) {
                d += p * (lp[c] - lq[c]);
                g[c] = 0;  // its gradient is T (q - p), below
            } else if (divergence == Divergence::reverse_kl) {
                d += q * (lq[c] - lp[c]);
                g[c] = lq[c] - lp[c];
            } else {
                // 0 log 0 = 0: a side without mass at c adds nothing there (and where q = 0, G is not needed).
                const long double m = a * p + b * q;
                if (p > 0) d += wp * p * std::log(p / m);
                if (q > 0) d += wq * q * std::log(q / m);
                g[c] = q > 0 ? wq * (std::log(q / m) + 1) - b * (wp * p + wq * q) / m : 0;
            }
            if (q > 0) mean += q * g[c];
        }
        total += T * T * d;
        for (std::size_t c = 0; c < classes; ++c) {
            const long double q = std::exp(lq[c]);
            const long double row_gradient =
                divergence == Divergence::forward_kl ? T * (q - std::exp(lp[c])) : T * q * (g[c] - mean);
            gradient[r * classes + c] = row_gradient / static_cast<long double>(rows);
        }
    }
    return total / static_cast<long double>(rows);
}

// Students ~N(0, 3^2); teachers independent of them, or (closeness > 0) within ~closeness of them per logit.
template <class T>
bool agrees(Divergence divergence, double beta, double skew, std::size_t rows, std::size_t classes, double temperature,
            double tolerance, double closeness = 0.0) {
    std::mt19937_64 rng(classes);
    std::normal_distribution<double> normal(0.0, 3.0), noise(0.0, closeness > 0.0 ? closeness : 1.0);
    std::vector<double> s(rows * classes), t(rows * classes);
    for (double& x : s) x = static_cast<double>(static_cast<T>(normal(rng)));
    for (std::size_t i = 0; i < t.size(); ++i)
        t[i] = static_cast<double>(static_cast<T>(closeness > 0.0 ? s[i] + noise(rng) : normal(rng)));
    std::vector<long double> expected_gradient;
    const long double expected = reference(divergence, beta, skew, s, t, rows, classes, temperature, expected_gradient);

    const std::vector<T> student(s.begin(), s.end()), teacher(t.begin(), t.end());
    std::vector<T> gradient(rows * classes);
    const DistillationLoss<T> kd(temperature, 0.3, kdloss::Reduction::mean, -100, 1, divergence, beta, skew);
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

KD_TEST(each_divergence_matches_its_formula) {
    struct Case {
        Divergence divergence;
        double beta, skew;
    };
    const Case cases[] = {{Divergence::forward_kl, 0.5, 0.1},
                          {Divergence::reverse_kl, 0.5, 0.1},
                          {Divergence::jsd, 0.5, 0.1},
                          {Divergence::jsd, 0.1, 0.1},
                          {Divergence::skew_forward_kl, 0.5, 0.1},
                          {Divergence::skew_forward_kl, 0.5, 0.9},
                          {Divergence::skew_reverse_kl, 0.5, 0.1},
                          {Divergence::skew_reverse_kl, 0.5, 0.6}};
    for (const Case& c : cases)
        for (std::size_t classes : {3, 100, 161, 5000}) {
            // 17 rows: a block of 16 and one more. Long rows run one at a time, so fewer of them lose nothing.
            const std::size_t rows = classes > 1000 ? kdtest::sized(17, 2) : 17;
            for (double temperature : {1.0, 2.5}) {
                agrees<double>(c.divergence, c.beta, c.skew, rows, classes, temperature, 1e-12);
                agrees<float>(c.divergence, c.beta, c.skew, rows, classes, temperature, 1e-5);
            }
        }
}

// A student within 1e-3 of the teacher per logit, and T = 100: the loss is far smaller than the terms the kernels
// form it from, and such rows are computed again from u = p/q - 1 (exact_row.hpp). float within 1e-5 of the
// long-double truth, double within 1e-8 (the long-double reference, which takes logs of ratios near 1, is good to
// ~1e-9 here; the Python suite holds double to 1e-12 against mpmath). The mixtures at T = 1 only: at T = 100 their
// long-double reference is no better than ~1e-6.
KD_TEST(near_matches_and_large_temperatures_keep_their_precision) {
    for (Divergence divergence : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::jsd,
                                  Divergence::skew_forward_kl, Divergence::skew_reverse_kl})
        for (std::size_t classes : {10, 1000})
            for (double temperature : {1.0, 100.0}) {
                const bool plain = divergence == Divergence::forward_kl || divergence == Divergence::reverse_kl;
                if (!plain && temperature != 1.0) continue;
                agrees<float>(divergence, 0.5, 0.1, 17, classes, temperature, 1e-5, 1e-3);
                agrees<double>(divergence, 0.5, 0.1, 17, classes, temperature, 1e-8, 1e-3);
            }
}

// TRL's generalized JSD is forward KL at beta 0 and reverse KL at beta 1, and skew 0 is no skew: the same
// numbers, bit for bit.
KD_TEST(mixtures_at_their_ends_are_the_plain_divergences) {
    std::mt19937_64 rng(11);
    std::normal_distribution<double> normal(0.0, 3.0);
    const std::size_t rows = 5, classes = 700;
    std::vector<float> s(rows * classes), t(rows * classes), g1(rows * classes), g2(rows * classes);
    for (float& x : s) x = static_cast<float>(normal(rng));
    for (float& x : t) x = static_cast<float>(normal(rng));
    auto same = [&](Divergence a, double beta_a, double skew_a, Divergence b) {
        const DistillationLoss<float> one(2.0, 0.3, kdloss::Reduction::mean, -100, 1, a, beta_a, skew_a);
        const DistillationLoss<float> other(2.0, 0.3, kdloss::Reduction::mean, -100, 1, b);
        const double l1 =
            one.loss_and_gradient({s.data(), rows, classes}, {t.data(), rows, classes}, {}, {g1.data(), rows, classes});
        const double l2 = other.loss_and_gradient({s.data(), rows, classes}, {t.data(), rows, classes}, {},
                                                  {g2.data(), rows, classes});
        return KD_CHECK_EQ(l1, l2) && KD_CHECK(g1 == g2);
    };
    same(Divergence::jsd, 0.0, 0.1, Divergence::forward_kl);
    same(Divergence::jsd, 1.0, 0.1, Divergence::reverse_kl);
    same(Divergence::skew_forward_kl, 0.5, 0.0, Divergence::forward_kl);
    same(Divergence::skew_reverse_kl, 0.5, 0.0, Divergence::reverse_kl);
}

// A class both sides rule out contributes nothing; a class one side rules out leaves the mixtures finite.
KD_TEST(mixtures_stay_finite_under_masks) {
    const double inf = INFINITY;
    const std::vector<double> s = {1.0, -inf, 0.5, -inf, 2.0}, t = {-inf, 0.3, 0.1, -inf, 1.0};
    std::vector<double> gradient(5);
    for (Divergence divergence : {Divergence::jsd, Divergence::skew_forward_kl, Divergence::skew_reverse_kl}) {
        const DistillationLoss<double> kd(1.0, 0.3, kdloss::Reduction::mean, -100, 1, divergence, 0.3, 0.2);
        std::vector<long double> expected_gradient;
        const std::vector<double> s_finite = s, t_finite = t;
        const long double expected = reference(divergence, 0.3, 0.2, s_finite, t_finite, 1, 5, 1.0, expected_gradient);
        const double loss = kd.loss_and_gradient({s.data(), 1, 5}, {t.data(), 1, 5}, {}, {gradient.data(), 1, 5});
        KD_CHECK(std::isfinite(loss));
        KD_CHECK_CLOSE(loss, static_cast<double>(expected), 1e-12, 0.0);
        for (std::size_t c = 0; c < 5; ++c) {
            if (s[c] == -inf) KD_CHECK_EQ(gradient[c], 0.0);
            else KD_CHECK_CLOSE(gradient[c], static_cast<double>(expected_gradient[c]), 1e-12, 1e-15);
        }
    }
}

KD_TEST(divergence_names_round_trip_and_unknown_ones_are_refused) {
    KD_CHECK(kdloss::parse_divergence("forward_kl") == Divergence::forward_kl);
    KD_CHECK(kdloss::parse_divergence("reverse_kl") == Divergence::reverse_kl);
    KD_CHECK_EQ(std::string(kdloss::divergence_name(Divergence::reverse_kl)), std::string("reverse_kl"));
    KD_CHECK(kdloss::parse_divergence("jsd") == Divergence::jsd);
    KD_CHECK(kdloss::parse_divergence("skew_reverse_kl") == Divergence::skew_reverse_kl);
    KD_CHECK_EQ(std::string(kdloss::divergence_name(Divergence::skew_forward_kl)), std::string("skew_forward_kl"));
    const std::string names = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl'";
    KD_CHECK_THROWS(std::invalid_argument, "divergence must be one of " + names + ", got 'jsd!'",
                    kdloss::parse_divergence("jsd!"));
    KD_CHECK_THROWS(std::invalid_argument, "divergence must be one of " + names + ", got '7'",
                    DistillationLoss<double>(3.0, 0.3, kdloss::Reduction::mean, -100, 1, static_cast<Divergence>(7)));
    KD_CHECK(DistillationLoss<float>().divergence() == Divergence::forward_kl);
    KD_CHECK_EQ(DistillationLoss<float>().beta(), 0.5);
    KD_CHECK_EQ(DistillationLoss<float>().skew(), 0.1);
}

KD_TEST(beta_and_skew_are_checked_with_the_python_messages) {
    using kdloss::Reduction;
    KD_CHECK_THROWS(std::invalid_argument, "beta must be in [0, 1], got 1.5",
                    DistillationLoss<double>(3.0, 0.3, Reduction::mean, -100, 1, Divergence::jsd, 1.5));
    KD_CHECK_THROWS(std::invalid_argument, "beta must be in [0, 1], got nan",
                    DistillationLoss<double>(3.0, 0.3, Reduction::mean, -100, 1, Divergence::jsd, NAN));
    KD_CHECK_THROWS(std::invalid_argument, "skew must be in [0, 1), got 1",
                    DistillationLoss<float>(3.0, 0.3, Reduction::mean, -100, 1, Divergence::skew_forward_kl, 0.5, 1.0));
    KD_CHECK_THROWS(
        std::invalid_argument, "skew must be in [0, 1), got -0.1",
        DistillationLoss<float>(3.0, 0.3, Reduction::mean, -100, 1, Divergence::skew_reverse_kl, 0.5, -0.1));
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
    for (Divergence divergence : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::jsd,
                                  Divergence::skew_forward_kl, Divergence::skew_reverse_kl}) {
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
