// Run-time choice of the row kernels: the widest instruction set that was compiled in and that this CPU
// (and its operating system) supports, unless KDLOSS_FORCE_ISA names one. Also kdloss.build_info().

#include "dispatch.hpp"

#include <pybind11/pybind11.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kdloss/detail/thread_pool.hpp"
#include "kdloss/version.hpp"
#include "register.hpp"

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <immintrin.h>
#include <intrin.h>
#endif

namespace kdloss::python {

namespace {

namespace py = pybind11;

struct CpuFeatures {
    bool avx2 = false;    // with FMA
    bool avx512 = false;  // F, DQ, VL and BW: the x86-64-v4 set
};

CpuFeatures detect_cpu() {
    CpuFeatures cpu;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    // These also check that the operating system saves the wide registers (XCR0).
    __builtin_cpu_init();
    cpu.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    cpu.avx512 = cpu.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    int info[4];
    __cpuid(info, 0);
    const int max_leaf = info[0];
    __cpuid(info, 1);
    const bool fma = (info[2] & (1 << 12)) != 0;
    const bool os_saves_ymm = (info[2] & (1 << 27)) != 0 && (_xgetbv(0) & 0x6) == 0x6;
    const bool os_saves_zmm = os_saves_ymm && (_xgetbv(0) & 0xE6) == 0xE6;
    if (max_leaf >= 7) {
        __cpuidex(info, 7, 0);
        const unsigned ebx = static_cast<unsigned>(info[1]);
        cpu.avx2 = os_saves_ymm && fma && (ebx & (1u << 5)) != 0;
        cpu.avx512 = cpu.avx2 && os_saves_zmm && (ebx & (1u << 16)) && (ebx & (1u << 17)) && (ebx & (1u << 30)) &&
                     (ebx & (1u << 31));
    }
#endif
    return cpu;
}

// Compiled-in kernel tables, narrowest first.
std::vector<KernelTable> compiled_tables() {
    std::vector<KernelTable> tables{baseline_kernel_table()};
#ifdef KDLOSS_HAS_AVX2_KERNELS
    tables.push_back(avx2_kernel_table());
#endif
#ifdef KDLOSS_HAS_AVX512_KERNELS
    tables.push_back(avx512_kernel_table());
#endif
#ifdef KDLOSS_HAS_NATIVE_KERNELS
    tables.push_back(native_kernel_table());
#endif
    return tables;
}

// "native" was compiled for the building machine: it runs there, and is only ever chosen by name.
bool is_native(const KernelTable& table) { return std::string(table.isa) == "native"; }

bool cpu_runs(const KernelTable& table, const CpuFeatures& cpu) {
    const std::string isa = table.isa;
    return isa == "baseline" || is_native(table) || (isa == "avx2" && cpu.avx2) || (isa == "avx512" && cpu.avx512);
}

const char* forced_isa() {
    const char* value = std::getenv("KDLOSS_FORCE_ISA");
    return value != nullptr && *value != '\0' ? value : nullptr;
}

KernelTable choose_kernels() {
    const CpuFeatures cpu = detect_cpu();
    const std::vector<KernelTable> tables = compiled_tables();
    if (const char* forced = forced_isa()) {
        for (const KernelTable& table : tables) {
            if (forced != std::string(table.isa)) continue;
            if (!cpu_runs(table, cpu))
                throw std::runtime_error(std::string("KDLOSS_FORCE_ISA=") + forced + ": this CPU cannot run it");
            return table;
        }
        std::string names;
        for (const KernelTable& table : tables) names += std::string(names.empty() ? "" : ", ") + table.isa;
        throw std::runtime_error(std::string("KDLOSS_FORCE_ISA=") + forced +
                                 " is not compiled into this build; choose one of: " + names);
    }
    KernelTable best = tables.front();
    for (const KernelTable& table : tables)
        if (cpu_runs(table, cpu) && !is_native(table)) best = table;
    return best;
}

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
    const CpuFeatures cpu = detect_cpu();
    py::list compiled, runnable;
    for (const KernelTable& table : compiled_tables()) {
        compiled.append(table.isa);
        if (cpu_runs(table, cpu)) runnable.append(table.isa);
    }
    py::dict info;
    info["version"] = KDLOSS_VERSION_STRING;
    info["compiler"] = compiler_name();
    info["compiled_isas"] = compiled;
    info["cpu_isas"] = runnable;
    info["active_isa"] = active_kernels().isa;
    const char* forced = forced_isa();
    info["forced_isa"] = forced != nullptr ? py::object(py::str(forced)) : py::object(py::none());
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

const KernelTable& active_kernels() {
    static const KernelTable table = choose_kernels();
    return table;
}

void register_build_info(py::module_& module) {
    active_kernels();  // a bad KDLOSS_FORCE_ISA fails the import, not some later call
    module.def("build_info", &build_info,
               "What this build of kdloss compiled, what the CPU supports and which kernels run.");
}

}  // namespace kdloss::python
