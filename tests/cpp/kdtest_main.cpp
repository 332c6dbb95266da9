// The main() of the C++ test executables: runs the KD_TEST functions registered in the executable's
// other files, or with an argument only those whose name or file name contains it.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "kdloss/isa.hpp"
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

// Whether this CPU lacks what code built with the flags of `isa` (CMakeLists.txt's kdloss_flags_*) needs. An
// unknown name is not skipped: kdloss::kdloss then refuses it, and the suite fails.
static bool cpu_lacks(const std::string& isa) {
    if (isa != "avx2" && isa != "avx512") return false;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    if (isa == "avx2") return !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
    return !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"));
#else
    return true;
#endif
}

int main(int argc, char** argv) {
#ifdef KDTEST_REQUIRED_ISA
    const char* required = KDTEST_REQUIRED_ISA;
#else
    // The suite against kdloss::kdloss with an instruction set forced (tests/cpp/CMakeLists.txt).
    const char* required = std::getenv("KDLOSS_FORCE_ISA");
#endif
    if (required != nullptr && cpu_lacks(required)) {
        std::printf("skipped: this CPU cannot run code built for %s\n", required);
        return 77;  // ctest's SKIP_RETURN_CODE
    }
    try {
        std::printf("kernels: %s\n", kdloss::isa_info().active.c_str());
    } catch (const std::exception& error) {
        std::printf("%s\n", error.what());
        return 1;
    }
    return kdtest::run_all(argc, argv);
}
