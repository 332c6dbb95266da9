// The shape of the public C++ API as a host meets it: defaults equal to Python's, value semantics, the
// implicit conversions that let a host pass its buffers as they are, and the version.

#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kdtest.hpp"

namespace test_api {

using kdloss::ClassIndices;
using kdloss::DistillationLoss;
using kdloss::Labels;
using kdloss::MatrixView;
using kdloss::Reduction;

// Views and labels are small trivially-copyable values, passed by value at no cost.
static_assert(std::is_trivially_copyable_v<MatrixView<float>>);
static_assert(std::is_trivially_copyable_v<MatrixView<const double>>);
static_assert(std::is_trivially_copyable_v<ClassIndices>);
static_assert(std::is_trivially_copyable_v<Labels<double>>);
// A mutable view converts to a const one, not the other way round.
static_assert(std::is_convertible_v<MatrixView<double>, MatrixView<const double>>);
static_assert(!std::is_convertible_v<MatrixView<const double>, MatrixView<double>>);
static_assert(!std::is_convertible_v<MatrixView<float>, MatrixView<const double>>);
// Labels come implicitly from class indices or target distributions (const or not), never from the wrong type.
static_assert(std::is_convertible_v<ClassIndices, Labels<float>>);
static_assert(std::is_convertible_v<MatrixView<const float>, Labels<float>>);
static_assert(std::is_convertible_v<MatrixView<float>, Labels<float>>);
static_assert(!std::is_convertible_v<MatrixView<const double>, Labels<float>>);
// The loss object is a value: copyable, movable without throwing, and not built implicitly from a number.
static_assert(std::is_nothrow_copy_constructible_v<DistillationLoss<double>>);
static_assert(std::is_nothrow_move_constructible_v<DistillationLoss<float>>);
static_assert(std::is_nothrow_copy_assignable_v<DistillationLoss<float>>);
static_assert(!std::is_convertible_v<double, DistillationLoss<double>>);
static_assert(std::is_default_constructible_v<DistillationLoss<double>>);
// Views can be built at compile time.
constexpr MatrixView<const float> constexpr_view{nullptr, 0, 4};
static_assert(constexpr_view.row_stride == 4);
static_assert(MatrixView<const float>{nullptr, 2, 3, 8}.row_stride == 8);

KD_TEST(defaults_match_python) {
    const DistillationLoss<double> kd;
    KD_CHECK_EQ(kd.temperature(), 3.0);
    KD_CHECK_EQ(kd.alpha(), 0.3);
    KD_CHECK(kd.reduction() == Reduction::mean);
    KD_CHECK_EQ(kd.ignore_index(), std::int64_t{-100});
    KD_CHECK_EQ(DistillationLoss<float>::default_ignore_index, std::int64_t{-100});
    KD_CHECK_EQ(kd.num_threads(), std::size_t{1});  // the calling thread only, unless asked
    KD_CHECK(DistillationLoss<double>(3.0, 0.3, Reduction::mean, -100, 0).num_threads() >=
             1);  // 0: all hardware threads
    KD_CHECK_EQ(DistillationLoss<double>(3.0, 0.3, Reduction::mean, -100, 3).num_threads(), std::size_t{3});
    KD_CHECK_EQ(std::string(kdloss::reduction_name(Reduction::mean)), std::string("mean"));
    KD_CHECK_EQ(std::string(kdloss::reduction_name(Reduction::sum)), std::string("sum"));
    KD_CHECK_EQ(std::string(kdloss::reduction_name(Reduction::none)), std::string("none"));
}

// One Parameters value holds them all: the constructor's arguments, the accessors and a rejected setter agree.
KD_TEST(parameters_are_one_value) {
    kdloss::Parameters wanted;
    wanted.temperature = 2.5;
    wanted.alpha = 0.25;
    wanted.reduction = Reduction::sum;
    wanted.ignore_index = -7;
    wanted.num_threads = 0;  // every hardware thread: resolved when checked
    DistillationLoss<float> kd(wanted);
    const kdloss::Parameters& held = kd.parameters();
    KD_CHECK_EQ(held.temperature, 2.5);
    KD_CHECK_EQ(held.alpha, 0.25);
    KD_CHECK(held.reduction == Reduction::sum);
    KD_CHECK_EQ(held.ignore_index, std::int64_t{-7});
    KD_CHECK(held.num_threads >= 1 && held.num_threads == kd.num_threads());
    const DistillationLoss<double> same(2.5, 0.25, Reduction::sum, -7, 0);
    KD_CHECK_EQ(same.parameters().num_threads, held.num_threads);
    KD_CHECK_THROWS(std::invalid_argument, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0",
                    kd.set_temperature(0.0));
    KD_CHECK_EQ(kd.temperature(), 2.5);  // a rejected value changes nothing
    kd.set_alpha(1.0);
    KD_CHECK_EQ(kd.parameters().alpha, 1.0);
}

KD_TEST(views_address_rows) {
    double data[12] = {};
    const MatrixView<double> dense{data, 3, 4};
    KD_CHECK_EQ(dense.row_stride, std::ptrdiff_t{4});
    KD_CHECK(dense.row(2) == data + 8);
    const MatrixView<double> padded{data, 2, 3, 6};
    KD_CHECK(padded.row(1) == data + 6);
    const MatrixView<const double> as_const = padded;
    KD_CHECK(as_const.data == data && as_const.rows == 2 && as_const.cols == 3 && as_const.row_stride == 6);
    const std::int64_t labels[6] = {0, -1, 1, -1, 2, -1};
    const ClassIndices every_other{labels, 3, 2};
    KD_CHECK_EQ(every_other[2], std::int64_t{2});
    const ClassIndices dense_labels{labels, 6};
    KD_CHECK_EQ(dense_labels.stride, std::ptrdiff_t{1});
}

KD_TEST(mutable_views_are_accepted_where_const_ones_are) {
    std::vector<double> s{1, 2, 0.5}, t{1.5, 1.8, 0.6}, y{0, 1, 0}, g(3, 0.0);
    const MatrixView<double> sv{s.data(), 1, 3}, tv{t.data(), 1, 3}, yv{y.data(), 1, 3}, gv{g.data(), 1, 3};
    const DistillationLoss<double> kd(3.0, 0.5);
    KD_CHECK_CLOSE(kd.loss_and_gradient(sv, tv, yv, gv), 0.25465032, 0, 1e-8);
    KD_CHECK_CLOSE(g[1], -0.12252327, 0, 1e-8);
}

KD_TEST(labels_default_to_none) {
    const Labels<float> none;
    KD_CHECK(none.kind == Labels<float>::Kind::none);
    const std::int64_t index = 1;
    const Labels<float> indices = ClassIndices{&index, 1};
    KD_CHECK(indices.kind == Labels<float>::Kind::class_indices);
    const float y[2] = {0.5f, 0.5f};
    const Labels<float> distributions = MatrixView<const float>{y, 1, 2};
    KD_CHECK(distributions.kind == Labels<float>::Kind::distributions);
}

KD_TEST(copies_are_independent) {
    DistillationLoss<double> a(2.0, 0.1, Reduction::sum, 5, 2);
    DistillationLoss<double> b = a;
    b.set_temperature(4.0);
    b.set_alpha(0.9);
    KD_CHECK_EQ(a.temperature(), 2.0);
    KD_CHECK_EQ(a.alpha(), 0.1);
    KD_CHECK_EQ(b.temperature(), 4.0);
    KD_CHECK(b.reduction() == Reduction::sum);
    KD_CHECK_EQ(b.ignore_index(), std::int64_t{5});
    KD_CHECK_EQ(b.num_threads(), std::size_t{2});
}

KD_TEST(version_is_the_projects) {
    KD_CHECK_EQ(std::string(kdloss::version), std::string(KDLOSS_VERSION_STRING));
    const std::string expected = std::to_string(KDLOSS_VERSION_MAJOR) + "." + std::to_string(KDLOSS_VERSION_MINOR) +
                                 "." + std::to_string(KDLOSS_VERSION_PATCH);
    KD_CHECK_EQ(std::string(kdloss::version), expected);
#ifdef KDLOSS_TEST_PROJECT_VERSION
    KD_CHECK_EQ(std::string(kdloss::version), std::string(KDLOSS_TEST_PROJECT_VERSION));  // what CMake read
#endif
}

// Which kernels run: the library's choice among what it compiled and the CPU runs, or the forced one;
// header-only, the host's own.
KD_TEST(isa_info_names_the_kernels_that_run) {
    const kdloss::IsaInfo info = kdloss::isa_info();
    auto has = [](const std::vector<std::string>& names, const std::string& name) {
        return std::find(names.begin(), names.end(), name) != names.end();
    };
    KD_CHECK(has(info.supported, info.active));
    for (const std::string& name : info.supported) KD_CHECK(has(info.compiled, name));
#if defined(KDLOSS_DISPATCHED)
    KD_CHECK(info.compiled.front() == "baseline");
    const char* forced = std::getenv("KDLOSS_FORCE_ISA");
    KD_CHECK_EQ(info.forced, std::string(forced != nullptr ? forced : ""));
    if (!info.forced.empty()) {
        KD_CHECK_EQ(info.active, info.forced);
    } else {  // the widest the CPU runs, never the building machine's own copy
        std::string widest;
        for (const std::string& name : info.supported)
            if (name != "native") widest = name;
        KD_CHECK_EQ(info.active, widest);
    }
#else
    KD_CHECK_EQ(info.active, std::string("header_only"));
    KD_CHECK(info.forced.empty());
#endif
}

}  // namespace test_api
