// The gradient is the derivative of the returned loss: central finite differences of compute_loss in
// double, for every reduction, every label form (none, class indices with ignored rows, one-hot and soft
// target distributions), alpha in {0, 0.3, 1} and several temperatures; and the gradient agrees with the
// independent long-double reference to the specification's 1e-12.

#include <cmath>
#include <string>

#include "kdtest.hpp"
#include "support.hpp"

namespace test_gradient_fd {

using kdloss::DistillationLoss;
using namespace kdsupport;

struct LabelCase {
    LabelKind kind;
    bool soft_targets;
    const char* name;
};

constexpr LabelCase label_cases[] = {
    {LabelKind::none, false, "none"},
    {LabelKind::indices, false, "indices"},
    {LabelKind::distributions, false, "one-hot"},
    {LabelKind::distributions, true, "soft"},
};

// d loss / d student[k] by (L(x + h) - L(x - h)) / 2h.
double central_difference(const DistillationLoss<double>& kd, Problem p, std::size_t k) {
    const double x = p.student[k];
    const double h = 1e-5 * std::fmax(1.0, std::fabs(x));
    p.student[k] = x + h;
    const double up = loss_only(kd, p);
    p.student[k] = x - h;
    const double down = loss_only(kd, p);
    return (up - down) / ((x + h) - (x - h));
}

KD_TEST(gradient_matches_central_differences) {
    Generator gen(20240611);
    std::size_t checked = 0;
    for (const Reduction reduction : all_reductions)
        for (const LabelCase& labels : label_cases)
            for (const double alpha : {0.0, 0.3, 1.0})
                for (const double temperature : {0.5, 1.0, 3.0}) {
                    const Problem p = gen.problem(5, 7, labels.kind, 3.0, -100, labels.soft_targets);
                    const Params params{temperature, alpha, reduction, -100};
                    const DistillationLoss<double> kd(temperature, alpha, reduction);
                    const Output<double> out = run(kd, p);
                    for (std::size_t k = 0; k < p.student.size(); ++k) {
                        const double fd = central_difference(kd, p, k);
                        if (!KD_CHECK_CLOSE(out.gradient[k], fd, 1e-6, 1e-7))
                            std::fprintf(stderr, "  element %zu of %s, labels %s\n", k, describe(p, params).c_str(),
                                         labels.name);
                        ++checked;
                    }
                }
    KD_CHECK(checked == 3 * 4 * 3 * 3 * 35);
}

KD_TEST(gradient_and_loss_match_reference) {
    Generator gen(7);
    const std::size_t shapes[][2] = {{1, 1}, {1, 2}, {3, 5}, {8, 17}, {4, 1000}, {33, 3}};
    for (const auto& shape : shapes)
        for (const Reduction reduction : all_reductions)
            for (const LabelCase& labels : label_cases)
                for (const double alpha : {0.0, 0.25, 1.0})
                    for (const double temperature : {0.1, 1.0, 4.0})
                        for (const double spread : {1.0, 30.0}) {
                            const Problem p =
                                gen.problem(shape[0], shape[1], labels.kind, spread, -100, labels.soft_targets);
                            const Params params{temperature, alpha, reduction, -100};
                            const Reference ref = reference(p, params);
                            const Output<double> out = run(DistillationLoss<double>(temperature, alpha, reduction), p);
                            const bool ok = KD_CHECK_AGREES(out, ref, double_rtol, double_slack);
                            if (!ok)
                                std::fprintf(stderr, "  %s, labels %s, spread %g\n", describe(p, params).c_str(),
                                             labels.name, spread);
                        }
}

// The row-sum identity of the soft and hard gradients: each counted row's gradient sums to
// alpha * (sum y - sum y) + (1 - alpha) T (1 - 1) = 0.
KD_TEST(gradient_rows_sum_to_zero) {
    Generator gen(99);
    for (const LabelCase& labels : label_cases) {
        const Problem p = gen.problem(6, 50, labels.kind, 5.0, -100, labels.soft_targets);
        const Output<double> out = run(DistillationLoss<double>(2.0, 0.4, Reduction::sum), p);
        for (std::size_t i = 0; i < p.rows; ++i) {
            double sum = 0, size = 0;
            for (std::size_t c = 0; c < p.cols; ++c) {
                sum += out.gradient[i * p.cols + c];
                size += std::fabs(out.gradient[i * p.cols + c]);
            }
            KD_CHECK(std::fabs(sum) <= 1e-13 * (1 + size));
        }
    }
}

}  // namespace test_gradient_fd
