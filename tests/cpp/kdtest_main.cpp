// The main() of the C++ test executables: runs the KD_TEST functions registered in the executable's
// other files, or with an argument only those whose name or file name contains it.

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "kdtest.hpp"

int kdtest::run_all(int argc, char** argv) {
    const char* filter = argc > 1 ? argv[1] : nullptr;
    std::size_t passed = 0, failed = 0;
    for (const TestCase& test : registry()) {
        if (filter != nullptr && std::strstr(test.name, filter) == nullptr && std::strstr(test.file, filter) == nullptr)
            continue;
        current_failures() = 0;
        try {
            test.function();
        } catch (const std::exception& error) {
            report_failure(__FILE__, __LINE__, std::string("unexpected exception: ") + error.what());
        } catch (...) {
            report_failure(__FILE__, __LINE__, "unexpected non-std::exception");
        }
        const bool ok = current_failures() == 0;
        std::printf("%s %s\n", ok ? "[ OK ]  " : "[FAILED]", test.name);
        std::fflush(stdout);
        (ok ? passed : failed) += 1;
    }
    std::printf("%zu passed, %zu failed\n", passed, failed);
    if (passed + failed == 0) {
        std::fprintf(stderr, "no test matched\n");
        return 1;
    }
    return failed == 0 ? 0 : 1;
}

#ifdef KDTEST_REQUIRED_ISA
// Whether this CPU runs code built with the flags of KDTEST_REQUIRED_ISA (CMakeLists.txt's kdloss_flags_*).
static bool cpu_has_required_isa() {
    const std::string isa = KDTEST_REQUIRED_ISA;
    if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
    return false;
}
#endif

int main(int argc, char** argv) {
#ifdef KDTEST_REQUIRED_ISA
    if (!cpu_has_required_isa()) {
        std::printf("skipped: this CPU cannot run code built for %s\n", KDTEST_REQUIRED_ISA);
        return 77;  // ctest's SKIP_RETURN_CODE
    }
#endif
    return kdtest::run_all(argc, argv);
}
