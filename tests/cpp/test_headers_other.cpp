// A second translation unit that instantiates the same templates and inline functions as
// test_headers_main.cpp (see there).

#include <kdloss/kdloss.hpp>

#include <vector>

double loss_in_other_translation_unit(const std::vector<double>& s, const std::vector<double>& t);

double loss_in_other_translation_unit(const std::vector<double>& s, const std::vector<double>& t) {
    (void)kdloss::parse_reduction("sum");
    const kdloss::DistillationLoss<float> unused_float_instance(2.0, 0.1);
    (void)unused_float_instance.alpha();
    return kdloss::DistillationLoss<double>(3.0, 0.5).compute_loss({s.data(), 1, 3}, {t.data(), 1, 3});
}
