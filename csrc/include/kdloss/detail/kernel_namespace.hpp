#pragma once

// The kernels live in an inline namespace named by KDLOSS_KERNEL_NAMESPACE. A C++ host never sets it and
// gets kernels compiled with its own flags. The Python module compiles them once per instruction set
// (baseline, AVX2, AVX-512) and picks one at run time; distinct namespaces keep those copies from being
// merged by the linker, which would otherwise be free to keep an AVX-512 copy for the baseline path.
#ifndef KDLOSS_KERNEL_NAMESPACE
#define KDLOSS_KERNEL_NAMESPACE native
#endif
