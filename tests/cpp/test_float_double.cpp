// float and double agree: the float loss within 1e-5 relative and the float gradient within
// 1e-5 * max|gradient| of the double (and long-double reference) results on the same inputs, up to
// C = 200 000 classes and logits spread over +-1e4, as the specification asks; where the result is a
// small difference of large terms, within a few float roundoffs of those terms (kdsupport::agrees).

#include <algorithm>
#include <cmath>

#include "kdtest.hpp"
#include "support.hpp"

namespace test_float_double {

using kdloss::DistillationLoss;
using namespace kdsupport;

// Problems whose double values are exactly representable in float, so both types see the same input.
Problem rounded_to_float(Problem p) {
    for (auto* values : {&p.student, &p.teacher, &p.targets})
        for (double& v : *values) v = static_cast<double>(static_cast<float>(v));
    return p;
}

bool float_agrees(const Problem& p, const Params& params) {
    const Output<float> single = run(DistillationLoss<float>(params.temperature, params.alpha, params.reduction), p);
    const Output<double> twice = run(DistillationLoss<double>(params.temperature, params.alpha, params.reduction), p);
    const Reference ref = reference(p, params);

    bool ok = KD_CHECK_AGREES(single, ref, float_rtol, float_slack);
    // float against double directly, on the double's own accuracy.
    ok &= KD_CHECK(accurate(single.loss, twice.loss, ref.loss_magnitude, float_rtol, float_slack));
    long double largest = 0, error = 0;
    for (std::size_t k = 0; k < single.gradient.size(); ++k) {
        largest = std::max(largest, std::fabs(static_cast<long double>(twice.gradient[k])));
        error = std::max(error, std::fabs(static_cast<long double>(single.gradient[k]) - twice.gradient[k]));
    }
    ok &= KD_CHECK(error <= float_rtol * largest + float_slack * ref.gradient_magnitude);
    if (!ok) std::fprintf(stderr, "  %s\n", describe(p, params).c_str());
    return ok;
}

KD_TEST(float_agrees_with_double_on_random_batches) {
    Generator gen(31337);
    const std::size_t shapes[][2] = {{1, 1}, {2, 3}, {16, 10}, {5, 1000}, {3, 4097}};
    for (const auto& shape : shapes)
        for (const Reduction reduction : all_reductions)
            for (const LabelKind kind : all_label_kinds)
                for (const double alpha : {0.0, 0.3, 1.0})
                    for (const double temperature : {0.5, 3.0})
                        float_agrees(rounded_to_float(gen.problem(shape[0], shape[1], kind, 10.0)),
                                     {temperature, alpha, reduction, -100});
}

KD_TEST(float_is_accurate_for_wide_rows_and_huge_logits) {
    Generator gen(4242);
    for (const LabelKind kind : all_label_kinds)
        for (const double temperature : {1.0, 20.0}) {
            Problem p = rounded_to_float(gen.problem(2, kdtest::sized(200000, 20000), kind, 1e4));
            float_agrees(p, {temperature, 0.3, Reduction::mean, -100});
        }
}

// Teacher close to the student: the KL is a small difference of large terms, where float rounding of
// the two logs would show first.
KD_TEST(float_is_accurate_when_teacher_is_close_to_student) {
    Generator gen(5);
    Problem p = gen.problem(4, 20000, LabelKind::none, 50.0);
    for (std::size_t k = 0; k < p.teacher.size(); ++k) p.teacher[k] = p.student[k] + gen.uniform(-1e-2, 1e-2);
    float_agrees(rounded_to_float(p), {2.0, 0.3, Reduction::sum, -100});
}

}  // namespace test_float_double
