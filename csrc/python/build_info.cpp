// kdloss.build_info(): what this build compiled, what the CPU supports and which kernels run (the choice
// itself is the kdloss library's: csrc/lib/dispatch.cpp).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/thread_pool.hpp"
#include "kdloss/isa.hpp"
#include "kdloss/version.hpp"
#include "register.hpp"

namespace kdloss::python {

namespace {

namespace py = pybind11;

std::string compiler_name() {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
           std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
    return "msvc " + std::to_string(_MSC_VER);
#else
    return "unknown";
#endif
}

py::dict build_info() {
    const IsaInfo isa = isa_info();
    py::dict info;
    info["version"] = KDLOSS_VERSION_STRING;
    info["compiler"] = compiler_name();
    // How the kernels' vectors are written: GNU vector extensions (g++, clang), or the intrinsics of
    // intrinsic_registers.hpp (MSVC, or KDLOSS_NO_VECTOR_EXTENSIONS). This unit has the kernels' flags.
    info["vectors"] = KDLOSS_VECTOR_EXTENSIONS ? "gnu" : "intrinsics";
    info["compiled_isas"] = py::cast(isa.compiled);
    info["cpu_isas"] = py::cast(isa.supported);
    info["active_isa"] = isa.active;
    info["forced_isa"] = isa.forced.empty() ? py::object(py::none()) : py::object(py::str(isa.forced));
    info["hardware_threads"] = detail::ThreadPool::hardware_threads();
    // The kernels' internal limits, so that tests of their boundaries read them rather than copy them.
    py::dict block_max_classes;
    block_max_classes["float32"] = detail::block_max_classes<float>;
    block_max_classes["float64"] = detail::block_max_classes<double>;
    info["block_max_classes"] = block_max_classes;
    info["lanes"] = detail::lanes;
    return info;
}

}  // namespace

void register_build_info(py::module_& module) {
    detail::active_kernels();  // a bad KDLOSS_FORCE_ISA fails the import, not some later call
    module.def("build_info", &build_info,
               "What this build of kdloss compiled, what the CPU supports and which kernels run.");
}

}  // namespace kdloss::python
