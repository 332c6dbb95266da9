// A second translation unit including <kdloss/kdloss.hpp>, linked with test_headers_main.cpp (see there).
// It uses the header's inline functions and variables and the class template's inline members, and leaves
// the kernels to test_headers_main.cpp: a definition that lacks `inline` is a duplicate symbol at link time
// whether or not anything calls it, while a second instantiation of every kernel (weak symbols, of which the
// linker keeps one) would prove nothing more and double the time this test takes to build.

#include <kdloss/kdloss.hpp>

const char* const* version_in_other_translation_unit(double* alpha);

const char* const* version_in_other_translation_unit(double* alpha) {
    (void)kdloss::parse_reduction("sum");
    const kdloss::DistillationLoss<float> unused_float_instance(2.0, 0.1);
    *alpha = unused_float_instance.alpha();
    return &kdloss::version;  // an inline variable: one object, the same address in every unit
}
