// kdloss._core: the native half of the kdloss Python package.

#include <pybind11/pybind11.h>

#include "kdloss/version.hpp"
#include "register.hpp"

PYBIND11_MODULE(_core, module, pybind11::mod_gil_not_used()) {
    module.doc() = "Native kernels of kdloss (private: use the kdloss package).";
    module.attr("__version__") = KDLOSS_VERSION_STRING;
    kdloss::python::register_build_info(module);
    kdloss::python::register_distillation_loss(module);
    kdloss::python::register_teacher_cache(module);
}
