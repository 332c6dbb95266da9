#pragma once

// Test support: an independent long-double reference of the specification (it shares no code with the
// library, only the Reduction enum to name the reduction), random problems, and a runner that calls the
// library on a problem through its public C++ API.

#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kdtest.hpp"

namespace kdsupport {

using kdloss::Reduction;

constexpr long double inf = std::numeric_limits<long double>::infinity();

enum class LabelKind { none, indices, distributions };

inline const char* label_kind_name(LabelKind kind) {
    switch (kind) {
        case LabelKind::none: return "no labels";
        case LabelKind::indices: return "class indices";
        case LabelKind::distributions: return "target distributions";
    }
    return "?";
}

// A batch in contiguous row-major double storage; the float tests convert it.
struct Problem {
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::vector<double> student;
    std::vector<double> teacher;
    LabelKind kind = LabelKind::none;
    std::vector<std::int64_t> indices;  // rows entries when kind == indices
    std::vector<double> targets;        // rows * cols entries when kind == distributions
};

struct Params {
    double temperature = 3.0;
    double alpha = 0.3;
    Reduction reduction = Reduction::mean;
    std::int64_t ignore_index = -100;
};

struct Reference {
    long double loss = 0;                 // the reduced loss ("none": the sum of the rows)
    std::vector<long double> row_losses;  // ignored rows: 0
    std::vector<long double> gradient;    // d loss / d student
    // The size of what the formulas add up, |term| by |term|: a correct evaluation in a precision with
    // unit roundoff u can be off by a small multiple of u times these, however small the result is
    // (a loss of 1e-10 made of terms of size 1 is only known to about 1e-16 absolute).
    long double loss_magnitude = 0;
    std::vector<long double> row_magnitudes;
    long double gradient_magnitude = 0;  // max over elements
};

// |actual - expected| within rtol relative, plus `slack` times the magnitude of the terms.
inline bool accurate(long double actual, long double expected, long double magnitude, long double rtol,
                     long double slack) {
    if (!std::isfinite(expected)) return actual == expected || (std::isnan(actual) && std::isnan(expected));
    return std::fabs(actual - expected) <= rtol * std::fabs(expected) + slack * magnitude;
}

// log softmax(x * scale), formed from the shifted logits so that -inf stays an exact -inf.
inline std::vector<long double> log_softmax(const double* x, std::size_t n, long double scale) {
    long double top = -inf;
    for (std::size_t c = 0; c < n; ++c) top = std::max(top, static_cast<long double>(x[c]));
    long double sum = 0;
    for (std::size_t c = 0; c < n; ++c) sum += std::exp((static_cast<long double>(x[c]) - top) * scale);
    const long double log_sum = std::log(sum);
    std::vector<long double> out(n);
    for (std::size_t c = 0; c < n; ++c) out[c] = (static_cast<long double>(x[c]) - top) * scale - log_sum;
    return out;
}

// The specification, term by term: soft = T^2 KL(p_T || q_T) with 0 log 0 = 0, hard = -sum y log p_1,
// row = alpha hard + (1 - alpha) soft with labels (a term whose weight is 0 is absent), soft alone
// without; gradient (1 - alpha) T (q_T - p_T) + alpha (p_1 sum y - y); "mean" divides by the rows that
// count, and is 0 when none does.
inline Reference reference(const Problem& p, const Params& params) {
    const std::size_t B = p.rows, C = p.cols;
    const long double T = params.temperature, alpha = params.alpha;
    const bool labelled = p.kind != LabelKind::none;
    const long double soft_weight = labelled ? 1 - alpha : 1, hard_weight = labelled ? alpha : 0;

    Reference r;
    r.row_losses.assign(B, 0);
    r.row_magnitudes.assign(B, 0);
    r.gradient.assign(B * C, 0);
    std::vector<long double> gradient_magnitudes(B * C, 0);
    std::size_t counted = 0;
    long double total = 0, total_magnitude = 0;
    for (std::size_t i = 0; i < B; ++i) {
        if (p.kind == LabelKind::indices && p.indices[i] == params.ignore_index) continue;
        ++counted;
        const double* s = &p.student[i * C];
        const double* t = &p.teacher[i * C];
        std::vector<long double> y(C, 0);
        if (p.kind == LabelKind::indices) y[static_cast<std::size_t>(p.indices[i])] = 1;
        if (p.kind == LabelKind::distributions)
            for (std::size_t c = 0; c < C; ++c) y[c] = p.targets[i * C + c];

        const auto log_q = log_softmax(s, C, 1 / T), log_p = log_softmax(t, C, 1 / T), log_p1 = log_softmax(s, C, 1);
        std::vector<long double> q(C), pt(C), p1(C);
        for (std::size_t c = 0; c < C; ++c) {
            q[c] = std::exp(log_q[c]);
            pt[c] = std::exp(log_p[c]);
            p1[c] = std::exp(log_p1[c]);
        }
        // Magnitudes: log p - log q = (t - s)/T - (max t - max s)/T - log Z_t + log Z_s and
        // -log p_1,c = log Z - (s_c - max s), each part by its absolute value (log Z = -max_c log p_c),
        // plus 1 for the roundoff of O(1) intermediate values.
        const auto log_normaliser = [](const std::vector<long double>& log_prob) {
            return -*std::max_element(log_prob.begin(), log_prob.end());
        };
        long double s_max = -inf, t_max = -inf;
        for (std::size_t c = 0; c < C; ++c) {
            s_max = std::max(s_max, static_cast<long double>(s[c]));
            t_max = std::max(t_max, static_cast<long double>(t[c]));
        }
        const long double soft_common =
            1 + std::fabs(t_max - s_max) / T + std::fabs(log_normaliser(log_p)) + std::fabs(log_normaliser(log_q));
        const long double hard_common = 1 + std::fabs(log_normaliser(log_p1));
        long double row = 0, row_magnitude = 0;
        if (soft_weight != 0) {
            long double kl = 0, magnitude = 0;
            for (std::size_t c = 0; c < C; ++c) {
                const long double pc = pt[c];
                if (pc == 0) continue;
                kl += pc * (log_p[c] - log_q[c]);
                magnitude += pc * (soft_common + std::fabs(static_cast<long double>(t[c]) - s[c]) / T);
            }
            row += soft_weight * T * T * kl;
            row_magnitude += soft_weight * T * T * magnitude;
        }
        long double mass = 0;
        if (hard_weight != 0) {
            long double hard = 0, magnitude = 0;
            for (std::size_t c = 0; c < C; ++c) {
                mass += y[c];
                if (y[c] == 0) continue;
                hard -= y[c] * log_p1[c];
                magnitude += y[c] * (hard_common + std::fabs(static_cast<long double>(s[c]) - s_max));
            }
            row += hard_weight * hard;
            row_magnitude += hard_weight * magnitude;
        }
        for (std::size_t c = 0; c < C; ++c) {
            long double g = 0, magnitude = 0;
            if (soft_weight != 0) {
                g += soft_weight * T * (q[c] - pt[c]);
                magnitude += soft_weight * T * (q[c] + pt[c]);
            }
            if (hard_weight != 0) {
                g += hard_weight * (p1[c] * mass - y[c]);
                magnitude += hard_weight * (p1[c] * mass + y[c]);
            }
            r.gradient[i * C + c] = g;
            gradient_magnitudes[i * C + c] = magnitude;
        }
        r.row_losses[i] = row;
        r.row_magnitudes[i] = row_magnitude;
        total += row;
        total_magnitude += row_magnitude;
    }
    const long double divisor =
        params.reduction == Reduction::mean && counted > 0 ? static_cast<long double>(counted) : 1;
    r.loss = params.reduction == Reduction::mean && counted == 0 ? 0 : total / divisor;
    r.loss_magnitude = total_magnitude / divisor;
    for (std::size_t k = 0; k < B * C; ++k) {
        r.gradient[k] /= divisor;
        r.gradient_magnitude = std::max(r.gradient_magnitude, gradient_magnitudes[k] / divisor);
    }
    return r;
}

// Random problems from a fixed seed: logits uniform in [-spread, spread], some ignored rows.
class Generator {
public:
    explicit Generator(std::uint64_t seed) : engine_(seed) {}

    double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }
    std::size_t index(std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(engine_); }

    Problem problem(std::size_t rows, std::size_t cols, LabelKind kind, double spread = 3.0,
                    std::int64_t ignore_index = -100, bool soft_targets = false) {
        Problem p;
        p.rows = rows;
        p.cols = cols;
        p.kind = kind;
        for (std::size_t k = 0; k < rows * cols; ++k) {
            p.student.push_back(uniform(-spread, spread));
            p.teacher.push_back(uniform(-spread, spread));
        }
        if (kind == LabelKind::indices)
            for (std::size_t i = 0; i < rows; ++i)
                p.indices.push_back(rows > 1 && i % 4 == 3 ? ignore_index : static_cast<std::int64_t>(index(cols)));
        if (kind == LabelKind::distributions) {
            p.targets.assign(rows * cols, 0.0);
            for (std::size_t i = 0; i < rows; ++i) {
                if (soft_targets) {  // non-negative, not normalised: the API allows any finite mass
                    for (std::size_t c = 0; c < cols; ++c) p.targets[i * cols + c] = uniform(0.0, 1.0);
                } else {
                    p.targets[i * cols + index(cols)] = 1.0;
                }
            }
        }
        return p;
    }

private:
    std::mt19937_64 engine_;
};

// The library's outputs for a problem, computed in T through the public API.
template <class T>
struct Output {
    double loss = 0;
    std::vector<T> row_losses;
    std::vector<T> gradient;
};

template <class T>
std::vector<T> converted(const std::vector<double>& values) {
    return std::vector<T>(values.begin(), values.end());
}

template <class T>
Output<T> run(const kdloss::DistillationLoss<T>& kd, const Problem& p) {
    const std::vector<T> s = converted<T>(p.student), t = converted<T>(p.teacher), y = converted<T>(p.targets);
    kdloss::Labels<T> labels;
    if (p.kind == LabelKind::indices) labels = kdloss::ClassIndices{p.indices.data(), p.rows};
    if (p.kind == LabelKind::distributions) labels = kdloss::MatrixView<const T>{y.data(), p.rows, p.cols};
    Output<T> out;
    out.row_losses.assign(p.rows, T(-1));
    out.gradient.assign(p.rows * p.cols, T(-1));
    const kdloss::MatrixView<T> gradient{out.gradient.data(), p.rows, p.cols};
    out.loss =
        kd.evaluate({s.data(), p.rows, p.cols}, {t.data(), p.rows, p.cols}, labels, out.row_losses.data(), &gradient);
    return out;
}

template <class T>
double loss_only(const kdloss::DistillationLoss<T>& kd, const Problem& p) {
    const std::vector<T> s = converted<T>(p.student), t = converted<T>(p.teacher), y = converted<T>(p.targets);
    kdloss::Labels<T> labels;
    if (p.kind == LabelKind::indices) labels = kdloss::ClassIndices{p.indices.data(), p.rows};
    if (p.kind == LabelKind::distributions) labels = kdloss::MatrixView<const T>{y.data(), p.rows, p.cols};
    return kd.compute_loss({s.data(), p.rows, p.cols}, {t.data(), p.rows, p.cols}, labels);
}

inline long double max_abs(const std::vector<long double>& values) {
    long double m = 0;
    for (long double v : values) m = std::max(m, std::fabs(v));
    return m;
}

template <class T>
long double max_abs_difference(const std::vector<T>& actual, const std::vector<long double>& expected) {
    long double m = 0;
    for (std::size_t k = 0; k < actual.size(); ++k)
        m = std::max(m, std::fabs(static_cast<long double>(actual[k]) - expected[k]));
    return m;
}

// The library's output against the reference: loss and row losses within rtol relative plus `slack`
// times their magnitude, the gradient within rtol * max|gradient| plus `slack` times its magnitude.
// Reports each failed check and returns whether all passed.
template <class T>
bool agrees(const Output<T>& out, const Reference& ref, long double rtol, long double slack, const char* file,
            int line) {
    bool ok = ::kdtest::check(accurate(out.loss, ref.loss, ref.loss_magnitude, rtol, slack), "loss", file, line);
    if (!ok)
        std::fprintf(stderr, "  loss %.17Lg, reference %.17Lg, magnitude %.3Lg\n", static_cast<long double>(out.loss),
                     ref.loss, ref.loss_magnitude);
    for (std::size_t i = 0; i < out.row_losses.size(); ++i) {
        if (accurate(out.row_losses[i], ref.row_losses[i], ref.row_magnitudes[i], rtol, slack)) continue;
        ok = ::kdtest::check(false, "row loss", file, line);
        std::fprintf(stderr, "  row %zu: %.17Lg, reference %.17Lg, magnitude %.3Lg\n", i,
                     static_cast<long double>(out.row_losses[i]), ref.row_losses[i], ref.row_magnitudes[i]);
    }
    long double largest = 0, error = 0;
    for (std::size_t k = 0; k < out.gradient.size(); ++k) {
        largest = std::max(largest, std::fabs(ref.gradient[k]));
        error = std::max(error, std::fabs(static_cast<long double>(out.gradient[k]) - ref.gradient[k]));
    }
    if (!(error <= rtol * largest + slack * ref.gradient_magnitude)) {
        ok = ::kdtest::check(false, "gradient", file, line);
        std::fprintf(stderr, "  gradient max-abs error %.3Lg, max|gradient| %.3Lg, magnitude %.3Lg\n", error, largest,
                     ref.gradient_magnitude);
    }
    return ok;
}

#define KD_CHECK_AGREES(out, ref, rtol, slack) ::kdsupport::agrees((out), (ref), (rtol), (slack), __FILE__, __LINE__)

// Tolerances of the specification, double within 1e-12 and float within 1e-5 relative, plus a slack for
// results that are small differences of large terms: about 45 double roundoffs, or 1.7 float roundoffs,
// of the magnitude of those terms.
constexpr long double double_rtol = 1e-12L, double_slack = 1e-14L;
constexpr long double float_rtol = 1e-5L, float_slack = 1e-7L;

inline std::string describe(const Problem& p, const Params& params) {
    return "B=" + std::to_string(p.rows) + " C=" + std::to_string(p.cols) + " " + label_kind_name(p.kind) +
           " T=" + std::to_string(params.temperature) + " alpha=" + std::to_string(params.alpha) +
           " reduction=" + kdloss::reduction_name(params.reduction);
}

constexpr Reduction all_reductions[] = {Reduction::mean, Reduction::sum, Reduction::none};
constexpr LabelKind all_label_kinds[] = {LabelKind::none, LabelKind::indices, LabelKind::distributions};

}  // namespace kdsupport
