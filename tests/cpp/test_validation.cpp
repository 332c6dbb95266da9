// Every validation error of the C++ API: the exception type (std::invalid_argument, which the Python
// binding turns into ValueError) and its exact message, which is the Python one; and that an error leaves
// the object and every output (gradient, per-row losses) untouched, even when the bad value comes after
// rows that are fine.

#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kdtest.hpp"
#include "support.hpp"

namespace test_validation {

using kdloss::ClassIndices;
using kdloss::DistillationLoss;
using kdloss::Labels;
using kdloss::MatrixView;
using kdloss::Reduction;
using std::invalid_argument;

constexpr double inf = std::numeric_limits<double>::infinity();
constexpr double nan = std::numeric_limits<double>::quiet_NaN();

template <class T>
void parameter_errors() {
    using Loss = DistillationLoss<T>;
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0",
                    Loss(0.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got -0",
                    Loss(-0.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got -1.5",
                    Loss(-1.5));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got inf",
                    Loss(inf));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got -inf",
                    Loss(-inf));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got nan",
                    Loss(nan));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got nan",
                    Loss(-nan));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got -0.1", Loss(3.0, -0.1));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got 1.0000001", Loss(3.0, 1.0000001));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got inf", Loss(3.0, inf));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got nan", Loss(3.0, nan));
    KD_CHECK_THROWS(invalid_argument, "num_threads must be at most 4096, got 4097",
                    Loss(3.0, 0.3, kdloss::Reduction::mean, -100, 4097));
    KD_CHECK_EQ(Loss(3.0, 0.3, kdloss::Reduction::mean, -100, 4096).num_threads(), std::size_t{4096});
    // The temperature's bounds themselves are fine; beyond them, the loss would lose its accuracy.
    KD_CHECK_NOTHROW(Loss(kdloss::min_temperature, 0.0));
    KD_CHECK_NOTHROW(Loss(kdloss::max_temperature, 1.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 1e-300",
                    Loss(1e-300, 0.0));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 1e+300",
                    Loss(1e300, 1.0));

    Loss kd(2.0, 0.25, Reduction::sum, 7);
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0",
                    kd.set_temperature(0.0));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got 2", kd.set_alpha(2.0));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got nan", kd.set_alpha(nan));
    KD_CHECK_EQ(kd.temperature(), 2.0);  // a failed setter changes nothing
    KD_CHECK_EQ(kd.alpha(), 0.25);
    KD_CHECK(kd.reduction() == Reduction::sum);
    KD_CHECK_EQ(kd.ignore_index(), std::int64_t{7});
    kd.set_temperature(0.5);
    kd.set_alpha(1.0);
    KD_CHECK_EQ(kd.temperature(), 0.5);
    KD_CHECK_EQ(kd.alpha(), 1.0);
}

KD_TEST(parameter_errors_double) { parameter_errors<double>(); }
KD_TEST(parameter_errors_float) { parameter_errors<float>(); }

KD_TEST(reduction_names) {
    KD_CHECK(kdloss::parse_reduction("mean") == Reduction::mean);
    KD_CHECK(kdloss::parse_reduction("sum") == Reduction::sum);
    KD_CHECK(kdloss::parse_reduction("none") == Reduction::none);
    KD_CHECK_THROWS(invalid_argument, "reduction must be one of 'mean', 'sum', 'none', got 'max'",
                    kdloss::parse_reduction("max"));
    KD_CHECK_THROWS(invalid_argument, "reduction must be one of 'mean', 'sum', 'none', got 'Mean'",
                    kdloss::parse_reduction("Mean"));
    KD_CHECK_THROWS(invalid_argument, "reduction must be one of 'mean', 'sum', 'none', got ''",
                    kdloss::parse_reduction(""));
    for (const Reduction r : {Reduction::mean, Reduction::sum, Reduction::none})
        KD_CHECK(kdloss::parse_reduction(kdloss::reduction_name(r)) == r);
}

// A 2 x 3 batch with sentinel-filled outputs; each error case must leave them as they were.
template <class T>
struct Batch {
    std::vector<T> s{T(1), T(2), T(0.5), T(-1), T(0), T(3)};
    std::vector<T> t{T(1.5), T(1.8), T(0.6), T(0), T(0), T(1)};
    std::vector<T> gradient = std::vector<T>(8, T(12345));  // room for a (2, 4) view
    std::vector<T> rows = std::vector<T>(3, T(-777));

    MatrixView<const T> sv(std::size_t r = 2, std::size_t c = 3) const { return {s.data(), r, c}; }
    MatrixView<const T> tv(std::size_t r = 2, std::size_t c = 3) const { return {t.data(), r, c}; }

    bool untouched() const {
        for (T v : gradient)
            if (v != T(12345)) return false;
        for (T v : rows)
            if (v != T(-777)) return false;
        return true;
    }
};

// Runs every method (compute_loss only if the fault is not in the gradient, which it does not take) and
// checks the exception and that the outputs are untouched.
#define KD_CHECK_REJECTS_IMPL(gradient_only, message, kd, student, teacher, labels, gradient_view)              \
    do {                                                                                                        \
        const auto gradient_view_copy = (gradient_view);                                                        \
        KD_CHECK_THROWS(invalid_argument, message,                                                              \
                        (kd).evaluate((student), (teacher), (labels), batch.rows.data(), &gradient_view_copy)); \
        if (!gradient_only)                                                                                     \
            KD_CHECK_THROWS(invalid_argument, message, (kd).compute_loss((student), (teacher), (labels)));      \
        KD_CHECK_THROWS(invalid_argument, message,                                                              \
                        (kd).compute_gradient((student), (teacher), (labels), gradient_view_copy));             \
        KD_CHECK_THROWS(invalid_argument, message,                                                              \
                        (kd).loss_and_gradient((student), (teacher), (labels), gradient_view_copy));            \
        KD_CHECK(batch.untouched());                                                                            \
    } while (false)
#define KD_CHECK_REJECTS(...) KD_CHECK_REJECTS_IMPL(false, __VA_ARGS__)
#define KD_CHECK_REJECTS_GRADIENT(...) KD_CHECK_REJECTS_IMPL(true, __VA_ARGS__)

template <class T>
void shape_and_label_errors() {
    Batch<T> batch;
    const DistillationLoss<T> kd(3.0, 0.5);
    const MatrixView<T> g23{batch.gradient.data(), 2, 3};
    const Labels<T> none{};

    KD_CHECK_REJECTS("student_logits must have at least one class, got shape (2, 0)", kd, batch.sv(2, 0),
                     batch.tv(2, 0), none, (MatrixView<T>{batch.gradient.data(), 2, 0}));
    KD_CHECK_REJECTS("student_logits must have at least one class, got shape (0, 0)", kd, batch.sv(0, 0),
                     batch.tv(0, 0), none, (MatrixView<T>{batch.gradient.data(), 0, 0}));
    KD_CHECK_REJECTS("teacher_logits must have the shape of student_logits (2, 3), got (2, 2)", kd, batch.sv(),
                     batch.tv(2, 2), none, g23);
    KD_CHECK_REJECTS("teacher_logits must have the shape of student_logits (2, 3), got (1, 3)", kd, batch.sv(),
                     batch.tv(1, 3), none, g23);
    KD_CHECK_REJECTS_GRADIENT("out must have the shape of student_logits (2, 3), got (2, 4)", kd, batch.sv(),
                              batch.tv(), none, (MatrixView<T>{batch.gradient.data(), 2, 4}));
    KD_CHECK_REJECTS_GRADIENT("out must have the shape of student_logits (2, 3), got (1, 3)", kd, batch.sv(),
                              batch.tv(), none, (MatrixView<T>{batch.gradient.data(), 1, 3}));

    // The gradient may not share memory with an input (the kernels write into it while they read them):
    // in place, or overlapping by a row, or overlapping the labels; the inputs stay as they were.
    const std::vector<T> s_before = batch.s, t_before = batch.t;
    KD_CHECK_REJECTS_GRADIENT("out must not share memory with the inputs", kd, batch.sv(), batch.tv(), none,
                              (MatrixView<T>{batch.s.data(), 2, 3}));
    KD_CHECK_REJECTS_GRADIENT("out must not share memory with the inputs", kd, batch.sv(1, 3), batch.tv(1, 3), none,
                              (MatrixView<T>{batch.s.data() + 2, 1, 3}));
    KD_CHECK_REJECTS_GRADIENT("out must not share memory with the inputs", kd, batch.sv(), batch.tv(), none,
                              (MatrixView<T>{batch.t.data() + 3, 2, 3, -3}));  // rows reversed: a negative stride
    std::vector<T> targets{T(0), T(1), T(0), T(0.25), T(0.5), T(0.25)};
    KD_CHECK_REJECTS_GRADIENT("out must not share memory with the inputs", kd, batch.sv(), batch.tv(),
                              (MatrixView<const T>{targets.data(), 2, 3}), (MatrixView<T>{targets.data(), 2, 3}));
    KD_CHECK(batch.s == s_before && batch.t == t_before);
    // Views next to each other, sharing no element, are fine.
    std::vector<T> side_by_side(12, T(0));
    std::copy(batch.s.begin(), batch.s.end(), side_by_side.begin());
    KD_CHECK_NOTHROW(kd.compute_gradient(MatrixView<const T>{side_by_side.data(), 2, 3}, batch.tv(), none,
                                         MatrixView<T>{side_by_side.data() + 6, 2, 3}));

    // Class indices: count, range (negative, == C, huge), checked for every row before any is computed.
    const std::vector<std::int64_t> three{1, 2, 0}, bad_last{1, 3}, negative{0, -1}, huge{std::int64_t{1} << 62, 0};
    KD_CHECK_REJECTS("true_labels as class indices must have shape (2,), got (3,)", kd, batch.sv(), batch.tv(),
                     (ClassIndices{three.data(), 3}), g23);
    KD_CHECK_REJECTS("true_labels as class indices must have shape (2,), got (1,)", kd, batch.sv(), batch.tv(),
                     (ClassIndices{three.data(), 1}), g23);
    KD_CHECK_REJECTS("true_labels[1] = 3 is not a class index in [0, 3) nor ignore_index (-100)", kd, batch.sv(),
                     batch.tv(), (ClassIndices{bad_last.data(), 2}), g23);
    KD_CHECK_REJECTS("true_labels[1] = -1 is not a class index in [0, 3) nor ignore_index (-100)", kd, batch.sv(),
                     batch.tv(), (ClassIndices{negative.data(), 2}), g23);
    KD_CHECK_REJECTS("true_labels[0] = 4611686018427387904 is not a class index in [0, 3) nor ignore_index (-100)", kd,
                     batch.sv(), batch.tv(), (ClassIndices{huge.data(), 2}), g23);
    const DistillationLoss<T> other_ignore(3.0, 0.5, Reduction::mean, -1);
    const std::vector<std::int64_t> old_ignore{-1, -100};
    KD_CHECK_REJECTS("true_labels[1] = -100 is not a class index in [0, 3) nor ignore_index (-1)", other_ignore,
                     batch.sv(), batch.tv(), (ClassIndices{old_ignore.data(), 2}), g23);

    // Target distributions: shape, then every value finite and >= 0.
    const T big = std::numeric_limits<T>::infinity();
    const std::vector<T> fine{T(0), T(1), T(0), T(0.25), T(0.5), T(0.25)};
    KD_CHECK_REJECTS("true_labels as target distributions must have the shape of student_logits (2, 3), got (2, 2)", kd,
                     batch.sv(), batch.tv(), (MatrixView<const T>{fine.data(), 2, 2}), g23);
    KD_CHECK_REJECTS("true_labels as target distributions must have the shape of student_logits (2, 3), got (1, 3)", kd,
                     batch.sv(), batch.tv(), (MatrixView<const T>{fine.data(), 1, 3}), g23);
    const std::pair<T, const char*> bad_values[] = {
        {T(-0.5), "true_labels[1, 2] = -0.5: target distributions must be finite and >= 0"},
        {big, "true_labels[1, 2] = inf: target distributions must be finite and >= 0"},
        {-big, "true_labels[1, 2] = -inf: target distributions must be finite and >= 0"},
        {std::numeric_limits<T>::quiet_NaN(), "true_labels[1, 2] = nan: target distributions must be finite and >= 0"},
    };
    for (const auto& [value, message] : bad_values) {
        std::vector<T> y = fine;
        y[5] = value;  // the very last value of the batch
        KD_CHECK_REJECTS(message, kd, batch.sv(), batch.tv(), (MatrixView<const T>{y.data(), 2, 3}), g23);
    }
    // -0.0 is >= 0: accepted.
    std::vector<T> negative_zero = fine;
    negative_zero[0] = -T(0);
    KD_CHECK_NOTHROW(kd.compute_loss(batch.sv(), batch.tv(), MatrixView<const T>{negative_zero.data(), 2, 3}));
}

KD_TEST(shape_and_label_errors_double) { shape_and_label_errors<double>(); }
KD_TEST(shape_and_label_errors_float) { shape_and_label_errors<float>(); }

// evaluate()'s normalizer (for gradient accumulation): absent (std::nullopt: the reduction's own divisor) or
// finite and >= min_normalizer, and not with reduction "none". Nothing is written on an error, the counted-rows output
// included.
template <class T>
void normalizer_errors() {
    Batch<T> batch;
    const MatrixView<T> g23{batch.gradient.data(), 2, 3};
    const std::vector<std::int64_t> labels{0, 2}, bad_labels{0, 3};
    const DistillationLoss<T> mean(3.0, 0.5), none(3.0, 0.5, Reduction::none);
    std::size_t counted = 12345;
    const std::pair<double, const char*> bad[] = {
        {-1.0, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got -1"},
        {0.0, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got 0"},
        {-0.0, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got -0"},
        {-1e-300, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got -1e-300"},
        {1e-320, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got 1e-320"},
        {inf, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got inf"},
        {nan, "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got nan"},
    };
    for (const auto& entry : bad) {
        const double normalizer = entry.first;  // not a structured binding: lambdas may not capture those in C++17
        KD_CHECK_THROWS(invalid_argument, entry.second,
                        mean.evaluate(batch.sv(), batch.tv(), ClassIndices{labels.data(), 2}, batch.rows.data(), &g23,
                                      normalizer, &counted));
    }
    KD_CHECK_THROWS(
        invalid_argument, "normalizer needs reduction 'mean' or 'sum', not 'none'",
        none.evaluate(batch.sv(), batch.tv(), ClassIndices{labels.data(), 2}, batch.rows.data(), &g23, 2.0, &counted));
    // A label error after a valid normalizer: the count is not written either.
    KD_CHECK_THROWS(invalid_argument, "true_labels[1] = 3 is not a class index in [0, 3) nor ignore_index (-100)",
                    mean.evaluate(batch.sv(), batch.tv(), ClassIndices{bad_labels.data(), 2}, batch.rows.data(), &g23,
                                  4.0, &counted));
    KD_CHECK(batch.untouched());
    KD_CHECK_EQ(counted, std::size_t{12345});
    KD_CHECK_NOTHROW(none.evaluate(batch.sv(), batch.tv(), {}, nullptr, nullptr, std::nullopt, &counted));
    KD_CHECK_EQ(counted, std::size_t{2});
}

KD_TEST(normalizer_errors_double) { normalizer_errors<double>(); }
KD_TEST(normalizer_errors_float) { normalizer_errors<float>(); }

// Shapes are checked before labels, labels before anything is written: with several faults the first in
// that order is reported.
KD_TEST(first_fault_is_reported) {
    Batch<double> batch;
    const DistillationLoss<double> kd;
    const std::vector<std::int64_t> bad{5, 5, 5};
    KD_CHECK_THROWS(invalid_argument, "teacher_logits must have the shape of student_logits (2, 3), got (2, 2)",
                    kd.compute_loss(batch.sv(), batch.tv(2, 2), ClassIndices{bad.data(), 3}));
    KD_CHECK_THROWS(invalid_argument, "true_labels as class indices must have shape (2,), got (3,)",
                    kd.compute_loss(batch.sv(), batch.tv(), ClassIndices{bad.data(), 3}));
    KD_CHECK_THROWS(invalid_argument, "true_labels[0] = 5 is not a class index in [0, 3) nor ignore_index (-100)",
                    kd.compute_loss(batch.sv(), batch.tv(), ClassIndices{bad.data(), 2}));
}

// Numbers in messages are the shortest text that reads back as the same double.
KD_TEST(messages_print_shortest_round_trip_numbers) {
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got 1.1",
                    DistillationLoss<double>(3.0, 1.1));
    KD_CHECK_THROWS(invalid_argument, "alpha must be finite and in [0, 1], got 1e+300",
                    DistillationLoss<double>(3.0, 1e300));
    KD_CHECK_THROWS(invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got -5e-324",
                    DistillationLoss<double>(-5e-324));
}

}  // namespace test_validation
