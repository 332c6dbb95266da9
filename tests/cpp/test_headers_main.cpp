// Linked with one translation unit per public header (each including only that header, twice) and with
// test_headers_other.cpp, which also includes <kdloss/kdloss.hpp>: every header compiles on its own, its
// include guard works, and no non-template function or variable lacks `inline` (that would be a duplicate
// symbol here). This unit instantiates the kernels (DistillationLoss<double>), so that they compile in each
// C++ standard the test is built for; the other unit's inline variable must be this unit's very object.

#include <kdloss/kdloss.hpp>

#include <cstdio>
#include <vector>

const char* const* version_in_other_translation_unit(double* alpha);

int main() {
    const std::vector<double> s{1, 2, 0.5}, t{1.5, 1.8, 0.6};
    const double here = kdloss::DistillationLoss<double>(3.0, 0.5).compute_loss({s.data(), 1, 3}, {t.data(), 1, 3});
    double alpha = 0.0;
    const char* const* there = version_in_other_translation_unit(&alpha);
    std::printf("kdloss %s: loss %.17g, alpha from the other unit %.17g\n", kdloss::version, here, alpha);
    if (!(here > 0.0449 && here < 0.0450 && there == &kdloss::version && alpha == 0.1)) {
        std::printf("0 passed, 1 failed\n");
        return 1;
    }
    std::printf("1 passed, 0 failed\n");
    return 0;
}
