#pragma once

#include "kernel_table.hpp"

namespace kdloss::python {

// The kernels chosen for this process: see dispatch.cpp.
const KernelTable& active_kernels();

}  // namespace kdloss::python
