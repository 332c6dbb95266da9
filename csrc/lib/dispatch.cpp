// Run-time choice of the kernels (isa.hpp): the widest instruction set that was compiled in and that this CPU
// (and its operating system) supports, unless KDLOSS_FORCE_ISA names one.

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kdloss/isa.hpp"
#include "kernel_tables.hpp"

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <immintrin.h>
#include <intrin.h>
#endif

namespace kdloss {

namespace {

using detail::KernelTable;

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
    std::vector<KernelTable> tables{detail::baseline_kernel_table()};
#ifdef KDLOSS_HAS_AVX2_KERNELS
    tables.push_back(detail::avx2_kernel_table());
#endif
#ifdef KDLOSS_HAS_AVX512_KERNELS
    tables.push_back(detail::avx512_kernel_table());
#endif
#ifdef KDLOSS_HAS_NATIVE_KERNELS
    tables.push_back(detail::native_kernel_table());
#endif
    return tables;
}

// "native" was compiled for the building machine: it runs there, and is only ever chosen by name.
bool is_native(const KernelTable& table) { return std::string(table.isa) == "native"; }

bool cpu_runs(const KernelTable& table, const CpuFeatures& cpu) {
    const std::string isa = table.isa;
    return isa == "baseline" || is_native(table) || (isa == "avx2" && cpu.avx2) || (isa == "avx512" && cpu.avx512);
}

std::string forced_isa() {
    const char* value = std::getenv("KDLOSS_FORCE_ISA");
    return value != nullptr ? value : "";
}

KernelTable choose_kernels() {
    const CpuFeatures cpu = detect_cpu();
    const std::vector<KernelTable> tables = compiled_tables();
    const std::string forced = forced_isa();
    if (!forced.empty()) {
        for (const KernelTable& table : tables) {
            if (forced != table.isa) continue;
            if (!cpu_runs(table, cpu))
                throw std::runtime_error("KDLOSS_FORCE_ISA=" + forced + ": this CPU cannot run it");
            return table;
        }
        std::string names;
        for (const KernelTable& table : tables) names += std::string(names.empty() ? "" : ", ") + table.isa;
        throw std::runtime_error("KDLOSS_FORCE_ISA=" + forced +
                                 " is not compiled into this build; choose one of: " + names);
    }
    KernelTable best = tables.front();
    for (const KernelTable& table : tables)
        if (cpu_runs(table, cpu) && !is_native(table)) best = table;
    return best;
}

}  // namespace

const detail::KernelTable& detail::active_kernels() {
    // Chosen once; a choice that throws (a bad KDLOSS_FORCE_ISA) throws again at the next call.
    static const KernelTable table = choose_kernels();
    return table;
}

IsaInfo isa_info() {
    IsaInfo info;
    info.active = detail::active_kernels().isa;
    const CpuFeatures cpu = detect_cpu();
    for (const KernelTable& table : compiled_tables()) {
        info.compiled.emplace_back(table.isa);
        if (cpu_runs(table, cpu)) info.supported.emplace_back(table.isa);
    }
    info.forced = forced_isa();
    return info;
}

}  // namespace kdloss
