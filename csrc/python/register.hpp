#pragma once

#include <pybind11/pybind11.h>

namespace kdloss::python {

void register_distillation_loss(pybind11::module_& module);
void register_teacher_cache(pybind11::module_& module);
void register_build_info(pybind11::module_& module);

}  // namespace kdloss::python
