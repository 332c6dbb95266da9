// The specification's check values (from the C# implementation, whose epsilon shifts the 10th digit, so
// they are compared at 1e-8), in double and float, with every label form and reduction.

#include <cstdint>
#include <vector>

#include "kdtest.hpp"
#include "support.hpp"

namespace test_check_values {

using kdloss::ClassIndices;
using kdloss::DistillationLoss;
using kdloss::MatrixView;
using kdloss::Reduction;

constexpr double check_loss = 0.25465032;
constexpr double check_gradient[3] = {0.05121834, -0.12252327, 0.07130493};
constexpr double check_loss_no_labels = 0.04493185;

template <class T>
struct CheckInput {
    std::vector<T> student{T(1), T(2), T(0.5)};
    std::vector<T> teacher{T(1.5), T(1.8), T(0.6)};
    std::vector<T> one_hot{T(0), T(1), T(0)};
    std::vector<std::int64_t> index{1};
    MatrixView<const T> s() const { return {student.data(), 1, 3}; }
    MatrixView<const T> t() const { return {teacher.data(), 1, 3}; }
};

template <class T>
void check_values(double rtol) {
    const CheckInput<T> in;
    const DistillationLoss<T> kd(3.0, 0.5);
    const kdloss::Labels<T> label_forms[] = {ClassIndices{in.index.data(), 1},
                                             MatrixView<const T>{in.one_hot.data(), 1, 3}};
    for (const auto& labels : label_forms) {
        KD_CHECK_CLOSE(kd.compute_loss(in.s(), in.t(), labels), check_loss, rtol, 1e-8);
        std::vector<T> gradient(3, T(99));
        kd.compute_gradient(in.s(), in.t(), labels, {gradient.data(), 1, 3});
        for (int c = 0; c < 3; ++c) KD_CHECK_CLOSE(gradient[c], check_gradient[c], rtol, 1e-8);
        std::vector<T> gradient2(3, T(99));
        KD_CHECK_CLOSE(kd.loss_and_gradient(in.s(), in.t(), labels, {gradient2.data(), 1, 3}), check_loss, rtol, 1e-8);
        KD_CHECK(gradient2 == gradient);
    }
    // Without labels only the soft term counts, whatever alpha is.
    for (double alpha : {0.0, 0.3, 0.5, 1.0}) {
        const DistillationLoss<T> no_labels(3.0, alpha);
        KD_CHECK_CLOSE(no_labels.compute_loss(in.s(), in.t()), check_loss_no_labels, rtol, 1e-8);
    }
}

KD_TEST(check_values_double) { check_values<double>(0.0); }
KD_TEST(check_values_float) { check_values<float>(1e-5); }  // float: the specification's 1e-5

KD_TEST(check_values_match_reference_to_full_precision) {
    kdsupport::Problem p;
    p.rows = 1;
    p.cols = 3;
    p.student = {1, 2, 0.5};
    p.teacher = {1.5, 1.8, 0.6};
    p.kind = kdsupport::LabelKind::indices;
    p.indices = {1};
    const kdsupport::Params params{3.0, 0.5, Reduction::mean, -100};
    const auto ref = kdsupport::reference(p, params);
    KD_CHECK_CLOSE(ref.loss, check_loss, 0, 1e-8);  // the reference agrees with the C# values too
    const auto out = kdsupport::run(DistillationLoss<double>(3.0, 0.5), p);
    KD_CHECK_CLOSE(out.loss, ref.loss, 1e-14, 0);
    for (std::size_t c = 0; c < 3; ++c) KD_CHECK_CLOSE(out.gradient[c], ref.gradient[c], 1e-13, 1e-16);
}

// The same row twice: "sum" doubles, "mean" does not, "none" gives each row its loss and returns their sum.
KD_TEST(check_values_under_every_reduction) {
    const std::vector<double> s{1, 2, 0.5, 1, 2, 0.5}, t{1.5, 1.8, 0.6, 1.5, 1.8, 0.6};
    const std::vector<std::int64_t> y{1, 1};
    const MatrixView<const double> sv{s.data(), 2, 3}, tv{t.data(), 2, 3};
    const ClassIndices labels{y.data(), 2};
    KD_CHECK_CLOSE(DistillationLoss<double>(3.0, 0.5, Reduction::mean).compute_loss(sv, tv, labels), check_loss, 0,
                   1e-8);
    KD_CHECK_CLOSE(DistillationLoss<double>(3.0, 0.5, Reduction::sum).compute_loss(sv, tv, labels), 2 * check_loss, 0,
                   2e-8);
    const DistillationLoss<double> none(3.0, 0.5, Reduction::none);
    std::vector<double> rows(2, -1.0), gradient(6, -1.0);
    const MatrixView<double> gv{gradient.data(), 2, 3};
    const double total = none.evaluate(sv, tv, labels, rows.data(), &gv);
    KD_CHECK_CLOSE(total, 2 * check_loss, 0, 2e-8);
    KD_CHECK_CLOSE(rows[0], check_loss, 0, 1e-8);
    KD_CHECK_CLOSE(rows[1], check_loss, 0, 1e-8);
    for (int c = 0; c < 3; ++c) {  // "none": the gradient of the sum, so each row's own gradient
        KD_CHECK_CLOSE(gradient[c], check_gradient[c], 0, 1e-8);
        KD_CHECK_CLOSE(gradient[3 + c], check_gradient[c], 0, 1e-8);
    }
    std::vector<double> mean_gradient(6, -1.0);
    DistillationLoss<double>(3.0, 0.5, Reduction::mean).compute_gradient(sv, tv, labels, {mean_gradient.data(), 2, 3});
    for (int c = 0; c < 3; ++c) KD_CHECK_CLOSE(mean_gradient[c], check_gradient[c] / 2, 0, 1e-8);
}

}  // namespace test_check_values
