// Linked with one translation unit per public header (each including only that header, twice) and with
// test_headers_other.cpp, which also includes <kdloss/kdloss.hpp>: every header compiles on its own, its
// include guard works, and no non-template function lacks `inline` (that would be a duplicate symbol here).

#include <kdloss/kdloss.hpp>

#include <cstdio>
#include <vector>

double loss_in_other_translation_unit(const std::vector<double>& s, const std::vector<double>& t);

int main() {
    const std::vector<double> s{1, 2, 0.5}, t{1.5, 1.8, 0.6};
    const double here = kdloss::DistillationLoss<double>(3.0, 0.5).compute_loss({s.data(), 1, 3}, {t.data(), 1, 3});
    const double there = loss_in_other_translation_unit(s, t);
    std::printf("kdloss %s: %.17g %.17g\n", kdloss::version, here, there);
    if (!(here == there && here > 0.0449 && here < 0.0450)) {
        std::printf("0 passed, 1 failed\n");
        return 1;
    }
    std::printf("1 passed, 0 failed\n");
    return 0;
}
