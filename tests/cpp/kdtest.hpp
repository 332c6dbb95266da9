#pragma once

// kdtest: the few lines of test harness the C++ tests need, so that they depend on nothing but the
// standard library. A test executable is a set of KD_TEST functions run by kdtest_main.cpp (all of them,
// or with an argument those whose name or file contains it); a failed check prints its file, line,
// expression and values and marks the test failed, and the executable exits non-zero if any test
// failed, which is what ctest looks at.
//
//   KD_TEST(name) { ... }                               defines and registers a test
//   KD_CHECK(condition)                                 plain assertion
//   KD_CHECK_EQ(actual, expected)                       ==, printing both sides
//   KD_CHECK_CLOSE(actual, expected, rtol, atol)        |a - e| <= atol + rtol * |e| (equal infinities pass)
//   KD_CHECK_THROWS(Exception, "what()", expression)    throws Exception (or a subclass) with that message
//   KD_CHECK_NOTHROW(expression)

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <functional>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace kdtest {

// Whether the suite is built to run slowly (KDLOSS_TEST_REDUCED in CMake: under an emulator, where long double is
// software, or sanitized): the few tests that take minutes there run on smaller sizes, chosen with
// sized(full, reduced). The native optimised builds run the full sizes.
#ifdef KDTEST_REDUCED
inline constexpr bool reduced = true;
#else
inline constexpr bool reduced = false;
#endif

inline constexpr std::size_t sized(std::size_t full, std::size_t reduced_size) { return reduced ? reduced_size : full; }

struct TestCase {
    const char* name;
    const char* file;
    void (*function)();
};

inline std::vector<TestCase>& registry() {
    static std::vector<TestCase> tests;
    return tests;
}

struct Registrar {
    Registrar(const char* name, const char* file, void (*function)()) { registry().push_back({name, file, function}); }
};

// Failed checks in the test that is running.
inline std::size_t& current_failures() {
    static std::size_t failures = 0;
    return failures;
}

inline void report_failure(const char* file, int line, const std::string& what) {
    ++current_failures();
    std::fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what.c_str());
}

template <class V>
std::string show(const V& value) {
    std::ostringstream out;
    if constexpr (std::is_floating_point_v<V>) out << std::setprecision(std::numeric_limits<V>::max_digits10) << value;
    else if constexpr (std::is_enum_v<V>) out << static_cast<long long>(value);
    else out << value;
    return out.str();
}

inline bool check(bool ok, const char* expression, const char* file, int line) {
    if (!ok) report_failure(file, line, expression);
    return ok;
}

template <class A, class E>
bool check_eq(const A& actual, const E& expected, const char* expression, const char* file, int line) {
    const bool ok = actual == expected;
    if (!ok) report_failure(file, line, std::string(expression) + " (" + show(actual) + " != " + show(expected) + ")");
    return ok;
}

inline bool close(long double actual, long double expected, long double rtol, long double atol) {
    if (std::isnan(expected)) return std::isnan(actual);
    if (std::isinf(expected)) return actual == expected;
    if (!std::isfinite(actual)) return false;
    return std::fabs(actual - expected) <= atol + rtol * std::fabs(expected);
}

inline bool check_close(long double actual, long double expected, long double rtol, long double atol,
                        const char* expression, const char* file, int line) {
    const bool ok = close(actual, expected, rtol, atol);
    if (!ok)
        report_failure(file, line,
                       std::string(expression) + " (actual " + show(actual) + ", expected " + show(expected) +
                           ", difference " + show(actual - expected) + ", rtol " + show(rtol) + ", atol " + show(atol) +
                           ")");
    return ok;
}

template <class Exception>
bool check_throws(const std::function<void()>& run, const std::string& expected_what, const char* expression,
                  const char* file, int line) {
    try {
        run();
    } catch (const Exception& error) {
        if (expected_what == error.what()) return true;
        report_failure(file, line,
                       std::string(expression) + " threw the right type with message\n    \"" + error.what() +
                           "\"\n  expected\n    \"" + expected_what + "\"");
        return false;
    } catch (const std::exception& error) {
        report_failure(file, line,
                       std::string(expression) + " threw " + typeid(error).name() + " (\"" + error.what() +
                           "\"), not " + typeid(Exception).name());
        return false;
    } catch (...) {
        report_failure(file, line, std::string(expression) + " threw a non-std::exception");
        return false;
    }
    report_failure(file, line, std::string(expression) + " did not throw " + typeid(Exception).name());
    return false;
}

inline bool check_nothrow(const std::function<void()>& run, const char* expression, const char* file, int line) {
    try {
        run();
        return true;
    } catch (const std::exception& error) {
        report_failure(file, line, std::string(expression) + " threw \"" + error.what() + "\"");
    } catch (...) {
        report_failure(file, line, std::string(expression) + " threw a non-std::exception");
    }
    return false;
}

// Runs every registered test, or with an argument those whose name or file name contains it; returns the
// process exit code.
int run_all(int argc, char** argv);

}  // namespace kdtest

#define KD_TEST(name)                                                                 \
    static void name();                                                               \
    static const ::kdtest::Registrar kdtest_registrar_##name{#name, __FILE__, &name}; \
    static void name()

#define KD_CHECK(condition) ::kdtest::check(static_cast<bool>(condition), #condition, __FILE__, __LINE__)
#define KD_CHECK_EQ(actual, expected) \
    ::kdtest::check_eq((actual), (expected), #actual " == " #expected, __FILE__, __LINE__)
#define KD_CHECK_CLOSE(actual, expected, rtol, atol)                                                            \
    ::kdtest::check_close(static_cast<long double>(actual), static_cast<long double>(expected), (rtol), (atol), \
                          #actual " ~ " #expected, __FILE__, __LINE__)
#define KD_CHECK_THROWS(Exception, expected_what, ...) \
    ::kdtest::check_throws<Exception>([&] { (void)(__VA_ARGS__); }, (expected_what), #__VA_ARGS__, __FILE__, __LINE__)
#define KD_CHECK_NOTHROW(...) ::kdtest::check_nothrow([&] { (void)(__VA_ARGS__); }, #__VA_ARGS__, __FILE__, __LINE__)
