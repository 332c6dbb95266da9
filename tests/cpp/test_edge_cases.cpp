// Edge cases of the C++ API: -inf masks, NaN / +inf propagation, B = 0, ignore_index (including every row
// ignored), row-strided, reversed and broadcast views of a host's buffers, C = 1, repeatability and
// concurrent calls on one object.

#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "kdtest.hpp"
#include "support.hpp"

namespace test_edge_cases {

using kdloss::ClassIndices;
using kdloss::DistillationLoss;
using kdloss::Labels;
using kdloss::MatrixView;
using namespace kdsupport;

constexpr double ninf = -std::numeric_limits<double>::infinity();

// One row through the library in T and through the reference; returns the library's output.
template <class T>
Output<T> one_row(const std::vector<double>& s, const std::vector<double>& t, LabelKind kind, std::int64_t index = 0,
                  std::vector<double> y = {}, double alpha = 0.5) {
    Problem p;
    p.rows = 1;
    p.cols = s.size();
    p.student = s;
    p.teacher = t;
    p.kind = kind;
    if (kind == LabelKind::indices) p.indices = {index};
    if (kind == LabelKind::distributions) p.targets = y;
    const Params params{2.0, alpha, Reduction::mean, -100};
    const Output<T> out = run(DistillationLoss<T>(params.temperature, params.alpha), p);
    const Reference ref = reference(p, params);
    const bool single = std::is_same_v<T, float>;
    KD_CHECK_AGREES(out, ref, single ? float_rtol : double_rtol, single ? float_slack : double_slack);
    for (std::size_t c = 0; c < p.cols; ++c)
        KD_CHECK(std::isfinite(out.gradient[c]));  // -inf masks never make the gradient non-finite
    return out;
}

template <class T>
void masks() {
    const std::vector<double> s{1.0, 2.0, 0.5, -1.0}, t{1.5, 1.8, 0.6, 0.2};
    // A class the teacher rules out contributes nothing to the soft term.
    {
        auto tm = t;
        tm[2] = ninf;
        const auto out = one_row<T>(s, tm, LabelKind::none);
        KD_CHECK(std::isfinite(out.loss));
    }
    // A class the student rules out where the teacher has mass: soft loss +inf, gradient finite.
    {
        auto sm = s;
        sm[0] = ninf;
        const auto out = one_row<T>(sm, t, LabelKind::none);
        KD_CHECK(out.loss == std::numeric_limits<double>::infinity());
    }
    // Both rule it out: finite, and that class's gradient is exactly 0.
    {
        auto sm = s, tm = t;
        sm[1] = tm[1] = ninf;
        const auto out = one_row<T>(sm, tm, LabelKind::none);
        KD_CHECK(std::isfinite(out.loss));
        KD_CHECK_EQ(out.gradient[1], T(0));
        const auto labelled = one_row<T>(sm, tm, LabelKind::indices, 3);
        KD_CHECK(std::isfinite(labelled.loss));
        KD_CHECK_EQ(labelled.gradient[1], T(0));
        const auto distribution = one_row<T>(sm, tm, LabelKind::distributions, 0, {0.5, 0.0, 0.25, 0.25});
        KD_CHECK(std::isfinite(distribution.loss));
        KD_CHECK_EQ(distribution.gradient[1], T(0));
    }
    // The student rules out the labelled class: the hard term is +inf when it counts, absent when alpha = 0.
    {
        auto sm = s, tm = t;
        sm[2] = tm[2] = ninf;
        KD_CHECK(one_row<T>(sm, tm, LabelKind::indices, 2).loss == std::numeric_limits<double>::infinity());
        KD_CHECK(std::isfinite(one_row<T>(sm, tm, LabelKind::indices, 2, {}, 0.0).loss));
        KD_CHECK(one_row<T>(sm, tm, LabelKind::distributions, 0, {0, 0, 1, 0}).loss ==
                 std::numeric_limits<double>::infinity());
        // ... and a target with no mass there costs nothing.
        KD_CHECK(std::isfinite(one_row<T>(sm, tm, LabelKind::distributions, 0, {0.3, 0.7, 0, 0}).loss));
    }
    // Only one class left: softmax is one-hot, the loss 0 and the gradient 0.
    {
        const std::vector<double> sm{ninf, 4.0, ninf}, tm{ninf, -3.0, ninf};
        const auto out = one_row<T>(sm, tm, LabelKind::indices, 1);
        KD_CHECK_EQ(out.loss, 0.0);
        for (T g : out.gradient) KD_CHECK_EQ(g, T(0));
    }
}

KD_TEST(minus_inf_masks_double) { masks<double>(); }
KD_TEST(minus_inf_masks_float) { masks<float>(); }

// NaN and +inf propagate as NaN (documented); so does a row whose logits are all -inf.
KD_TEST(nan_and_plus_inf_propagate_as_nan) {
    const double nan = std::numeric_limits<double>::quiet_NaN(), pinf = std::numeric_limits<double>::infinity();
    const DistillationLoss<double> kd(3.0, 0.5);
    const std::vector<std::int64_t> label{1};
    const std::vector<double> good{1.0, 2.0, 0.5};
    const std::vector<std::vector<double>> bad_rows{{nan, 2.0, 0.5}, {pinf, 2.0, 0.5}, {ninf, ninf, ninf}};
    for (const auto& bad : bad_rows) {
        KD_CHECK(std::isnan(kd.compute_loss({bad.data(), 1, 3}, {good.data(), 1, 3}, ClassIndices{label.data(), 1})));
        KD_CHECK(std::isnan(kd.compute_loss({good.data(), 1, 3}, {bad.data(), 1, 3})));
    }
}

KD_TEST(empty_batch) {
    for (const Reduction reduction : all_reductions) {
        const DistillationLoss<double> kd(3.0, 0.5, reduction);
        const DistillationLoss<float> kf(3.0, 0.5, reduction);
        // A host may pass null pointers for an empty batch.
        KD_CHECK_EQ(kd.compute_loss({nullptr, 0, 5}, {nullptr, 0, 5}), 0.0);
        KD_CHECK_EQ(kd.compute_loss({nullptr, 0, 5}, {nullptr, 0, 5}, ClassIndices{nullptr, 0}), 0.0);
        KD_CHECK_EQ(kd.compute_loss({nullptr, 0, 5}, {nullptr, 0, 5}, MatrixView<const double>{nullptr, 0, 5}), 0.0);
        KD_CHECK_EQ(kf.compute_loss({nullptr, 0, 5}, {nullptr, 0, 5}), 0.0);
        const MatrixView<double> no_gradient{nullptr, 0, 5};
        KD_CHECK_EQ(kd.loss_and_gradient({nullptr, 0, 5}, {nullptr, 0, 5}, ClassIndices{nullptr, 0}, no_gradient), 0.0);
        KD_CHECK_EQ(kd.evaluate({nullptr, 0, 5}, {nullptr, 0, 5}, {}, nullptr, &no_gradient), 0.0);
        // And real, empty buffers: nothing is written.
        std::vector<double> sentinel(4, 42.0);
        const MatrixView<double> gradient{sentinel.data(), 0, 4};
        KD_CHECK_EQ(kd.evaluate({sentinel.data(), 0, 4}, {sentinel.data(), 0, 4}, {}, sentinel.data() + 2, &gradient),
                    0.0);
        KD_CHECK(sentinel == std::vector<double>(4, 42.0));
    }
}

KD_TEST(single_class) {
    const std::vector<double> s{3.0, -1.0}, t{-2.0, 7.0}, y{0.5, 2.0};
    const std::vector<std::int64_t> labels{0, 0};
    for (const Reduction reduction : all_reductions) {
        const DistillationLoss<double> kd(2.0, 0.5, reduction);
        std::vector<double> gradient(2, 9.0);
        KD_CHECK_EQ(kd.loss_and_gradient({s.data(), 2, 1}, {t.data(), 2, 1}, ClassIndices{labels.data(), 2},
                                         {gradient.data(), 2, 1}),
                    0.0);
        KD_CHECK(gradient == std::vector<double>(2, 0.0));
        KD_CHECK_EQ(kd.loss_and_gradient({s.data(), 2, 1}, {t.data(), 2, 1}, MatrixView<const double>{y.data(), 2, 1},
                                         {gradient.data(), 2, 1}),
                    0.0);
        KD_CHECK(gradient == std::vector<double>(2, 0.0));
    }
}

// Problem p without the rows whose label is ignored.
Problem without_ignored(const Problem& p, std::int64_t ignore_index) {
    Problem kept = p;
    kept.rows = 0;
    kept.student.clear();
    kept.teacher.clear();
    kept.indices.clear();
    for (std::size_t i = 0; i < p.rows; ++i) {
        if (p.indices[i] == ignore_index) continue;
        ++kept.rows;
        kept.indices.push_back(p.indices[i]);
        kept.student.insert(kept.student.end(), p.student.begin() + i * p.cols, p.student.begin() + (i + 1) * p.cols);
        kept.teacher.insert(kept.teacher.end(), p.teacher.begin() + i * p.cols, p.teacher.begin() + (i + 1) * p.cols);
    }
    return kept;
}

template <class T>
void ignore_index_leaves_rows_out(std::int64_t ignore_index) {
    Generator gen(static_cast<std::uint64_t>(ignore_index + 1000));
    for (const Reduction reduction : all_reductions) {
        Problem p = gen.problem(9, 6, LabelKind::indices, 4.0, ignore_index);
        // Ignored rows are not even read: NaN logits there change nothing.
        for (std::size_t i = 0; i < p.rows; ++i)
            if (p.indices[i] == ignore_index)
                for (std::size_t c = 0; c < p.cols; ++c)
                    p.student[i * p.cols + c] = p.teacher[i * p.cols + c] = std::numeric_limits<double>::quiet_NaN();
        const DistillationLoss<T> kd(2.5, 0.4, reduction, ignore_index);
        const Output<T> out = run(kd, p);
        const Output<T> kept = run(kd, without_ignored(p, ignore_index));
        KD_CHECK_CLOSE(out.loss, kept.loss, 1e-15, 0);
        std::size_t k = 0;
        for (std::size_t i = 0; i < p.rows; ++i) {
            const bool ignored = p.indices[i] == ignore_index;
            if (ignored) {
                KD_CHECK_EQ(out.row_losses[i], T(0));
            } else {
                KD_CHECK_CLOSE(out.row_losses[i], kept.row_losses[k], 1e-15, 0);
            }
            for (std::size_t c = 0; c < p.cols; ++c) {
                if (ignored) KD_CHECK_EQ(out.gradient[i * p.cols + c], T(0));
                else KD_CHECK_CLOSE(out.gradient[i * p.cols + c], kept.gradient[k * p.cols + c], 1e-15, 0);
            }
            k += ignored ? 0 : 1;
        }
    }
}

KD_TEST(ignore_index_default) {
    ignore_index_leaves_rows_out<double>(-100);
    ignore_index_leaves_rows_out<float>(-100);
}
KD_TEST(ignore_index_custom) {
    ignore_index_leaves_rows_out<double>(-1);
    ignore_index_leaves_rows_out<double>(std::numeric_limits<std::int64_t>::min());
}

// An ignore_index that is also a valid class leaves out exactly the rows with that label.
KD_TEST(ignore_index_that_is_a_class) {
    const std::vector<double> s{1, 2, 0.5, 1, 2, 0.5}, t{1.5, 1.8, 0.6, 1.5, 1.8, 0.6};
    const std::vector<std::int64_t> labels{2, 1};
    const DistillationLoss<double> kd(3.0, 0.5, Reduction::mean, 2);
    std::vector<double> gradient(6, 5.0);
    const double loss = kd.loss_and_gradient({s.data(), 2, 3}, {t.data(), 2, 3}, ClassIndices{labels.data(), 2},
                                             {gradient.data(), 2, 3});
    KD_CHECK_CLOSE(loss, 0.25465032, 0, 1e-8);
    for (int c = 0; c < 3; ++c) KD_CHECK_EQ(gradient[c], 0.0);
    KD_CHECK_CLOSE(gradient[4], -0.12252327, 0, 1e-8);
}

KD_TEST(every_row_ignored) {
    const std::vector<double> s{1, 2, 0.5, -1, 0, 3}, t{1.5, 1.8, 0.6, 0, 0, 1};
    const std::vector<std::int64_t> labels{-100, -100};
    for (const Reduction reduction : all_reductions) {
        const DistillationLoss<double> kd(3.0, 0.5, reduction);
        std::vector<double> gradient(6, 5.0), rows(2, 5.0);
        const MatrixView<double> gv{gradient.data(), 2, 3};
        const double loss =
            kd.evaluate({s.data(), 2, 3}, {t.data(), 2, 3}, ClassIndices{labels.data(), 2}, rows.data(), &gv);
        KD_CHECK_EQ(loss, 0.0);  // never NaN, even for "mean"
        KD_CHECK(!std::signbit(loss));
        KD_CHECK(gradient == std::vector<double>(6, 0.0));
        KD_CHECK(rows == std::vector<double>(2, 0.0));
        const DistillationLoss<float> kf(3.0, 0.5, reduction);
        const std::vector<float> sf(s.begin(), s.end()), tf(t.begin(), t.end());
        std::vector<float> gf(6, 5.0f);
        KD_CHECK_EQ(kf.loss_and_gradient({sf.data(), 2, 3}, {tf.data(), 2, 3}, ClassIndices{labels.data(), 2},
                                         {gf.data(), 2, 3}),
                    0.0);
        KD_CHECK(gf == std::vector<float>(6, 0.0f));
    }
}

// ignore_index concerns class indices only: target distributions and no labels count every row.
KD_TEST(ignore_index_does_not_apply_to_distributions) {
    const std::vector<double> s{1, 2, 0.5}, t{1.5, 1.8, 0.6}, y{0, 1, 0};
    const DistillationLoss<double> kd(3.0, 0.5, Reduction::mean, 1);
    KD_CHECK_CLOSE(kd.compute_loss({s.data(), 1, 3}, {t.data(), 1, 3}, MatrixView<const double>{y.data(), 1, 3}),
                   0.25465032, 0, 1e-8);
}

// A host's tensors are often slices: rows `stride` elements apart with other data between them. The
// padding holds NaN (so reading it would show) and the gradient's padding must stay as it was.
template <class T>
void strided_views() {
    const std::size_t B = 5, C = 7, stride = 11;
    const auto row_stride = static_cast<std::ptrdiff_t>(stride);
    Generator gen(17);
    for (const LabelKind kind : all_label_kinds)
        for (const Reduction reduction : all_reductions) {
            Problem p = gen.problem(B, C, kind, 3.0, -100, true);
            const DistillationLoss<T> kd(2.0, 0.3, reduction);
            const Output<T> dense = run(kd, p);

            const T pad = std::numeric_limits<T>::quiet_NaN(), sentinel = T(-4321);
            std::vector<T> s(B * stride, pad), t(B * stride, pad), y(B * stride, pad), g(B * stride + 3, sentinel);
            for (std::size_t i = 0; i < B; ++i)
                for (std::size_t c = 0; c < C; ++c) {
                    s[i * stride + c] = static_cast<T>(p.student[i * C + c]);
                    t[i * stride + c] = static_cast<T>(p.teacher[i * C + c]);
                    if (kind == LabelKind::distributions) y[i * stride + c] = static_cast<T>(p.targets[i * C + c]);
                }
            // Class indices 3 apart, with out-of-range values between them that must not be read.
            std::vector<std::int64_t> indices(3 * B, 999);
            for (std::size_t i = 0; i < p.indices.size(); ++i) indices[3 * i] = p.indices[i];
            Labels<T> labels;
            if (kind == LabelKind::indices) labels = ClassIndices{indices.data(), B, 3};
            if (kind == LabelKind::distributions) labels = MatrixView<const T>{y.data(), B, C, row_stride};

            std::vector<T> rows(B, sentinel);
            const MatrixView<T> gradient{g.data(), B, C, row_stride};
            const double loss =
                kd.evaluate({s.data(), B, C, row_stride}, {t.data(), B, C, row_stride}, labels, rows.data(), &gradient);
            KD_CHECK_CLOSE(loss, dense.loss, 1e-15, 0);
            for (std::size_t i = 0; i < B; ++i) {
                KD_CHECK_CLOSE(rows[i], dense.row_losses[i], 1e-15, 0);
                for (std::size_t c = 0; c < stride; ++c) {
                    if (c < C) KD_CHECK_CLOSE(g[i * stride + c], dense.gradient[i * C + c], 1e-15, 0);
                    else KD_CHECK_EQ(g[i * stride + c], sentinel);
                }
            }
            for (std::size_t k = B * stride; k < g.size(); ++k) KD_CHECK_EQ(g[k], sentinel);
        }
}

KD_TEST(row_strided_views_double) { strided_views<double>(); }
KD_TEST(row_strided_views_float) { strided_views<float>(); }

// Negative strides (a batch stored last row first) and stride 0 (one teacher row broadcast to every
// student row), as NumPy views can be and the Python binding passes them in place.
KD_TEST(reversed_and_broadcast_views) {
    Generator gen(23);
    const std::size_t B = 4, C = 5;
    const auto stride = static_cast<std::ptrdiff_t>(C);
    Problem p = gen.problem(B, C, LabelKind::indices, 3.0);
    p.indices = {0, 4, 2, 1};
    const DistillationLoss<double> kd(3.0, 0.5, Reduction::sum);
    const Output<double> dense = run(kd, p);

    std::vector<double> s_rev(B * C), t_rev(B * C), g_rev(B * C, -1.0);
    std::vector<std::int64_t> y_rev(B);
    for (std::size_t i = 0; i < B; ++i) {
        for (std::size_t c = 0; c < C; ++c) {
            s_rev[(B - 1 - i) * C + c] = p.student[i * C + c];
            t_rev[(B - 1 - i) * C + c] = p.teacher[i * C + c];
        }
        y_rev[B - 1 - i] = p.indices[i];
    }
    const double* last_s = s_rev.data() + (B - 1) * C;
    const double* last_t = t_rev.data() + (B - 1) * C;
    const MatrixView<double> g{g_rev.data() + (B - 1) * C, B, C, -stride};
    const double loss = kd.loss_and_gradient({last_s, B, C, -stride}, {last_t, B, C, -stride},
                                             ClassIndices{y_rev.data() + (B - 1), B, -1}, g);
    KD_CHECK_CLOSE(loss, dense.loss, 1e-15, 0);
    for (std::size_t i = 0; i < B; ++i)
        for (std::size_t c = 0; c < C; ++c)
            KD_CHECK_CLOSE(g_rev[(B - 1 - i) * C + c], dense.gradient[i * C + c], 1e-15, 0);

    // Stride 0: every row reads the same teacher row.
    Problem same_teacher = p;
    for (std::size_t i = 1; i < B; ++i)
        for (std::size_t c = 0; c < C; ++c) same_teacher.teacher[i * C + c] = p.teacher[c];
    const Output<double> broadcast_dense = run(kd, same_teacher);
    std::vector<double> gb(B * C, -1.0);
    const double broadcast_loss = kd.loss_and_gradient({p.student.data(), B, C}, {p.teacher.data(), B, C, 0},
                                                       ClassIndices{p.indices.data(), B}, {gb.data(), B, C});
    KD_CHECK_CLOSE(broadcast_loss, broadcast_dense.loss, 1e-15, 0);
    for (std::size_t k = 0; k < B * C; ++k) KD_CHECK_CLOSE(gb[k], broadcast_dense.gradient[k], 1e-15, 0);
}

// The methods agree with each other and with themselves, call after call.
KD_TEST(methods_agree_and_repeat_exactly) {
    Generator gen(3);
    const Problem p = gen.problem(64, 300, LabelKind::indices, 8.0);
    const DistillationLoss<double> kd(4.0, 0.7);
    const Output<double> first = run(kd, p);
    const Output<double> second = run(kd, p);
    KD_CHECK_EQ(first.loss, second.loss);
    KD_CHECK(first.gradient == second.gradient);
    KD_CHECK(first.row_losses == second.row_losses);
    const MatrixView<const double> s{p.student.data(), p.rows, p.cols}, t{p.teacher.data(), p.rows, p.cols};
    const ClassIndices labels{p.indices.data(), p.rows};
    KD_CHECK_CLOSE(kd.compute_loss(s, t, labels), first.loss, 1e-15, 0);
    std::vector<double> gradient(p.rows * p.cols, 0.0), gradient2(p.rows * p.cols, 0.0);
    kd.compute_gradient(s, t, labels, {gradient.data(), p.rows, p.cols});
    KD_CHECK(gradient == first.gradient);
    KD_CHECK_EQ(kd.loss_and_gradient(s, t, labels, {gradient2.data(), p.rows, p.cols}), first.loss);
    KD_CHECK(gradient2 == first.gradient);
}

// num_threads splits rows across a shared pool; the results are bitwise those of one thread. The batches
// are large enough (tasks are ~32k elements, or up to four long rows) to be split into several tasks: of
// blocks of short rows, and runs of long rows, whose first row finds its maxima itself where the others
// have them found by the row before.
KD_TEST(thread_count_does_not_change_results) {
    Generator gen(8);
    for (const LabelKind kind : all_label_kinds)
        for (const Reduction reduction : all_reductions)
            for (const auto& [rows, classes] : {std::pair<std::size_t, std::size_t>{1500, 97}, {40, 2000}, {9, 8000}}) {
                const Problem p = gen.problem(rows, classes, kind, 6.0, -100, true);
                const Output<float> single = run(DistillationLoss<float>(2.0, 0.3, reduction, -100, 1), p);
                const Output<double> single_d = run(DistillationLoss<double>(2.0, 0.3, reduction, -100, 1), p);
                for (const std::size_t threads : {std::size_t{2}, std::size_t{3}, std::size_t{0}}) {
                    const Output<float> many = run(DistillationLoss<float>(2.0, 0.3, reduction, -100, threads), p);
                    KD_CHECK_EQ(many.loss, single.loss);
                    KD_CHECK(many.gradient == single.gradient);
                    KD_CHECK(many.row_losses == single.row_losses);
                    const Output<double> many_d = run(DistillationLoss<double>(2.0, 0.3, reduction, -100, threads), p);
                    KD_CHECK_EQ(many_d.loss, single_d.loss);
                    KD_CHECK(many_d.gradient == single_d.gradient);
                }
            }
}

// evaluate(normalizer = N): the sum over rows divided by N, loss and gradient, and the number of counted
// rows reported; so micro-batches evaluated with N = the whole batch's count add up to the whole batch.
KD_TEST(normalizer_accumulates_micro_batches) {
    Generator gen(21);
    const Problem whole = gen.problem(12, 9, LabelKind::indices, 4.0);  // rows 3, 7, 11 are ignored
    const DistillationLoss<double> mean(2.0, 0.4), sum(2.0, 0.4, Reduction::sum);
    const Output<double> expected = run(mean, whole);
    const std::size_t C = whole.cols;

    std::vector<double> gradient(whole.rows * C, -1.0);
    std::size_t counted_total = 0;
    const double normalizer = 9.0;  // counted rows in the whole batch
    double loss = 0.0;
    for (const auto& [begin, end] : {std::pair<std::size_t, std::size_t>{0, 5}, {5, 12}}) {
        const std::size_t B = end - begin;
        const MatrixView<double> g{gradient.data() + begin * C, B, C};
        for (const DistillationLoss<double>* kd : {&mean, &sum}) {
            std::size_t counted = 999;
            const double part =
                kd->evaluate({whole.student.data() + begin * C, B, C}, {whole.teacher.data() + begin * C, B, C},
                             ClassIndices{whole.indices.data() + begin, B}, nullptr, &g, normalizer, &counted);
            KD_CHECK_EQ(counted, B - (begin == 0 ? 1 : 2));
            if (kd == &sum) {  // the normalizer replaces the divisor whatever the reduction
                loss += part;
                counted_total += counted;
            }
        }
    }
    KD_CHECK_EQ(counted_total, std::size_t{9});
    KD_CHECK_CLOSE(loss, expected.loss, 1e-14, 0);
    for (std::size_t k = 0; k < gradient.size(); ++k) KD_CHECK_CLOSE(gradient[k], expected.gradient[k], 1e-14, 1e-300);
}

// One const object shared by several threads gives each the serial result.
KD_TEST(concurrent_calls_on_one_object) {
    Generator gen(11);
    std::vector<Problem> problems;
    for (int k = 0; k < 4; ++k) problems.push_back(gen.problem(400, 257, all_label_kinds[k % 3], 5.0));
    const DistillationLoss<float> kd(2.0, 0.3, Reduction::mean, -100, 2);  // and each call uses the shared pool
    std::vector<Output<float>> serial;
    for (const auto& p : problems) serial.push_back(run(kd, p));
    std::vector<int> mismatches(problems.size(), 0);
    std::vector<std::thread> threads;
    for (std::size_t k = 0; k < problems.size(); ++k)
        threads.emplace_back([&, k] {
            for (int repeat = 0; repeat < 10; ++repeat) {
                const Output<float> out = run(kd, problems[k]);
                if (out.loss != serial[k].loss || out.gradient != serial[k].gradient) ++mismatches[k];
            }
        });
    for (auto& thread : threads) thread.join();
    for (int m : mismatches) KD_CHECK_EQ(m, 0);
}

}  // namespace test_edge_cases
