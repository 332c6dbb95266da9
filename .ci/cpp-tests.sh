#!/usr/bin/env bash
# The C++ side of kdloss's CI, no Python needed:
#   - the ctest suite (tests/cpp) built warning-free with -Wall -Wextra -Wpedantic -Werror and run: with g++
#     (Release) against kdloss::kdloss, each of its instruction sets that this CPU runs forced in turn; with
#     clang++ (-O2) without GNU vector extensions (-DKDLOSS_NO_VECTOR_EXTENSIONS: the intrinsics registers that
#     MSVC compiles), against kdloss::kdloss, each instruction set forced in turn too; and under
#     AddressSanitizer + UndefinedBehaviorSanitizer (-fno-sanitize-recover=all), with clang++ when its sanitizer
#     runtimes are there, else with g++;
#   - the suite cross-compiled for aarch64 at -O2 and run under qemu (NEON), when Debian's cross g++ and
#     qemu-user are installed or can be (set KDLOSS_CI_AARCH64=0 to skip);
#   - the host program tests/cmake_consumer built against an install prefix (find_package, kdloss::kdloss, a
#     release build) and via add_subdirectory (kdloss::header_only), run, and its printed loss checked against
#     the specification's check value.
# clang++ is used when it is installed or Debian's clang can be installed here quickly (set KDLOSS_CI_CLANG=0
# to skip clang; g++ then builds the portable suite). Build trees live in build/ci-cpp.* (ignored by git, removed
# at the end): at the depth of the wheel's build tree in .ci/run, so that with .ci/ccache.sh's compiler cache the
# g++ suite's kernels, compiled with the wheel's flags, are the wheel's. Each step prints its wall time and its CPU
# time (on a busy machine the second says what it costs). The suites run two at a time (see "two lanes" below);
# .ci/run runs all this beside its Python side.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
start=$SECONDS

mkdir -p "$root/build"
work="$(mktemp -d "$root/build/ci-cpp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
jobs="$(nproc 2>/dev/null || echo 2)"

warnings="-Wall -Wextra -Wpedantic -Werror"
sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
check_loss=0.25465032   # the specification's check value (from C#, good to ~1e-8)

passed=0
failed=0
summary=()

# cpu_seconds PID: the CPU time (user + system) of shell PID's finished children so far, from /proc (0 where
# there is none). On a shared machine a step's wall time says little about its cost; its CPU time does.
ticks="$(getconf CLK_TCK 2>/dev/null || echo 100)"
cpu_seconds() { awk -v t="$ticks" '{ print int(($16 + $17) / t) }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# step NAME COMMAND...: runs COMMAND with its output in a log; prints the log's tail if it fails.
step() {
    local name="$1"
    shift
    local log="$work/log.$BASHPID.$((passed + failed))"  # $BASHPID: one name space per lane (below)
    last_log="$log"
    local t0=$SECONDS shell=$BASHPID c0
    c0="$(cpu_seconds "$shell")"
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        printf '  ok    %-58s %3ds %4ds cpu\n' "$name" $((SECONDS - t0)) $(($(cpu_seconds "$shell") - c0))
        return 0
    fi
    failed=$((failed + 1))
    printf '  FAIL  %-58s %3ds %4ds cpu\n' "$name" $((SECONDS - t0)) $(($(cpu_seconds "$shell") - c0))
    tail -n 60 "$log" | sed 's/^/        | /'
    return 1
}

# --- compilers ------------------------------------------------------------------------------------
# apt_install WHAT PACKAGE...: installs Debian packages for an optional part of the suite (WHAT), or says
# why it cannot and returns 1, so that the part is skipped.
apt_install() {
    local what="$1"
    shift
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "$what: not installed and no apt-get as root here; skipping $what"
        return 1
    fi
    local t0=$SECONDS
    echo "$what: installing Debian's $* (apt-get, at most ~2 minutes)"
    if ! { timeout 45 apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -qq --no-install-recommends "$@"; } \
        >"$work/apt-$what.log" 2>&1; then
        echo "$what: apt-get failed or was too slow after $((SECONDS - t0)) s; skipping $what"
        tail -n 5 "$work/apt-$what.log" | sed 's/^/        | /'
        return 1
    fi
    echo "$what: installed in $((SECONDS - t0)) s"
}

install_clang() {
    [ "${KDLOSS_CI_CLANG:-1}" != 0 ] || { echo "clang: skipped (KDLOSS_CI_CLANG=0)"; return 1; }
    command -v clang++ >/dev/null || apt_install clang clang || return 1
    # The sanitizer runtimes come in a separate package on Debian (libclang-rt-<major>-dev).
    printf 'int main() { return 0; }\n' >"$work/probe.cpp"
    if ! clang++ -fsanitize=address,undefined "$work/probe.cpp" -o "$work/probe" >/dev/null 2>&1 &&
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        local major
        major="$(clang++ -dumpversion | cut -d. -f1)"
        DEBIAN_FRONTEND=noninteractive timeout 60 apt-get install -y -qq --no-install-recommends \
            "libclang-rt-$major-dev" >>"$work/apt-clang.log" 2>&1 || true
    fi
    return 0
}

# An aarch64 cross g++ and qemu, to run the NEON kernels (the 128-bit path with 32 registers and fused
# multiply-adds) that no x86 machine runs.
install_aarch64() {
    [ "${KDLOSS_CI_AARCH64:-1}" != 0 ] || { echo "aarch64: skipped (KDLOSS_CI_AARCH64=0)"; return 1; }
    if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then return 0; fi
    apt_install aarch64 g++-aarch64-linux-gnu qemu-user
}

compilers=(g++)
if install_clang; then compilers+=(clang++); fi
aarch64=0
if install_aarch64; then aarch64=1; fi
# The suite runs sanitized once, with one compiler: ASan and UBSan check the program against the language's
# rules (bounds, lifetimes, overflow), which the source breaks or not whichever compiler instruments it, so a
# second compiler's sanitized run checked the same rules again for ~140 s more of CPU. clang++'s is kept when it
# has the sanitizer runtimes: its -fsanitize=undefined also checks float-to-integer conversions
# (float-cast-overflow, which g++'s leaves out, and the kernels convert floats to integers), and it builds in
# half g++'s time. Without them g++'s runs.
sanitized_cxx=g++
if [[ " ${compilers[*]} " == *" clang++ "* ]]; then
    if clang++ -fsanitize=address,undefined "$work/probe.cpp" -o "$work/probe" >/dev/null 2>&1; then
        sanitized_cxx=clang++
    else
        echo "clang: no sanitizer runtime (libclang-rt-*-dev); the sanitized suite runs with g++"
    fi
fi

cmake --version | head -n 1
for cxx in "${compilers[@]}"; do "$cxx" --version | head -n 1; done

# --- the ctest suite ------------------------------------------------------------------------------
# runnable_isas: kdloss::kdloss's instruction sets that this CPU runs, as a CMake list.
runnable_isas() {
    local isas=baseline flags
    flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
    if [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* ]]; then isas+=";avx2"; fi
    if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512dq "* && " $flags " == *" avx512vl "* &&
          " $flags " == *" avx512bw "* ]]; then isas+=";avx512"; fi
    echo "$isas"
}

# suite CXX MODE: configure, build and ctest the top-level project with the C++ tests.
suite() {
    local cxx="$1" mode="$2" build="$work/build-$1-$2"
    echo "$cxx: ctest suite, $mode"
    local flags="$warnings" link="" type=Release
    local headers=ON
    # g++ plain runs the suite against kdloss::kdloss, the library compiled for each instruction set, with each
    # forced in turn; the other suites against kdloss::header_only, the kernels compiled in the suite with the
    # suite's flags (no library: it would compile the kernels three times more in each).
    local targets=(-DKDLOSS_TEST_TARGETS=header_only -DKDLOSS_INSTALL=OFF)
    if [ "$mode" = plain ]; then
        # The sets this CPU runs: one it cannot run would be compiled only to be skipped (the wheel compiles every
        # set, and README's test command runs each that the CPU has). The warnings come from KDLOSS_WERROR alone,
        # so that the kernels' command lines are the wheel's (and, cached, compile once: .ci/ccache.sh).
        targets=(-DKDLOSS_TEST_TARGETS=kdloss "-DKDLOSS_KERNEL_ISAS=$(runnable_isas)")
        flags=""
    fi
    if [ "$mode" = sanitized ]; then
        # -O0: the sanitized build then takes a fifth of the time of -O1's, and its tests only twice as long.
        flags="-O0 -g $sanitizers -D_GLIBCXX_ASSERTIONS $warnings"
        link="$sanitizers"
        type=""       # the flags above only
        headers=OFF   # the standalone-header tests check compilation, which the plain build has done
        targets+=(-DKDLOSS_TEST_REDUCED=ON)  # the slowest tests on smaller sizes (kdtest::sized)
    elif [ "$mode" = portable ]; then
        # The kernels without GNU vector extensions: the intrinsics registers that MSVC compiles
        # (intrinsic_registers.hpp), for each instruction set this CPU runs (SSE2, AVX2, AVX-512 registers, each
        # forced in turn), all at -O2. clang++ fuses no multiply-add of intrinsics by itself, as MSVC does not.
        flags="-O2 -DKDLOSS_NO_VECTOR_EXTENSIONS $warnings"
        type=""
        headers=OFF
        targets=(-DKDLOSS_TEST_TARGETS=kdloss "-DKDLOSS_KERNEL_ISAS=$(runnable_isas)" -DKDLOSS_OPTIMIZE_KERNELS=OFF
                 -DKDLOSS_INSTALL=OFF)
    fi
    local cross=()
    if [ "$mode" = aarch64 ]; then
        # Cross-compiled at -O2, the level many hosts build with, and run by ctest through qemu.
        flags="-O2 $warnings"
        type=""
        headers=OFF
        cross=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
               "-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64;-L;/usr/aarch64-linux-gnu")
    fi
    step "$cxx $mode: configure" cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE="$type" \
        -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$link" \
        -DKDLOSS_BUILD_TESTS=ON -DKDLOSS_TEST_HEADERS="$headers" -DKDLOSS_WERROR=ON "${targets[@]}" "${cross[@]}" ||
        return 0
    step "$cxx $mode: build (-Werror)" cmake --build "$build" -j "$jobs" || return 0
    if step "$cxx $mode: ctest" ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$jobs"; then
        summary+=("$cxx $mode: $(grep -E 'tests passed' "$last_log" || true)")
    fi
}

# --- the consumer ---------------------------------------------------------------------------------
# Runs the consumer in build dir $1, keeps its output in $1/out.txt, and checks that it printed
# "loss <value>" within 1e-8 of the check value.
run_consumer() {
    "$1/kdloss_consumer" >"$1/out.txt" || return 1
    cat "$1/out.txt"
    awk -v want="$check_loss" '$1 == "loss" { d = $2 - want; if (d < 0) d = -d; found = 1; ok = (d < 1e-8) }
                               END { exit !(found && ok) }' "$1/out.txt"
}

# agree FILE1 FILE2: the two consumers' outputs have the same lines, their numbers within 1e-14 relative (a few
# ulps: one runs the library's kernels for this CPU, fused multiply-adds and all, the other the baseline's).
agree() {
    cat "$1" "$2"
    awk 'NR == FNR { line[FNR] = $0; lines = FNR; next }
         { n = split(line[FNR], a); if (n != NF || a[1] != $1) bad = 1
           for (i = 2; i <= NF; i++) { d = a[i] - $i; m = $i; if (d < 0) d = -d; if (m < 0) m = -m
                                       if (d > 1e-14 * m) bad = 1 } }
         END { exit bad || FNR != lines }' "$1" "$2"
}

# refuses_versions PREFIX VERSION...: configuring the consumer with find_package(kdloss VERSION) against
# PREFIX fails, and for the version's sake.
refuses_versions() {
    local prefix="$1" version
    shift
    for version in "$@"; do
        if cmake -S "$root/tests/cmake_consumer" -B "$work/consumer-version-$version" \
            -DKDLOSS_CONSUMER_VERSION="$version" -DCMAKE_PREFIX_PATH="$prefix"; then
            echo "find_package(kdloss $version) was accepted"
            return 1
        fi
    done 2>&1 | tee "$work/versions.log"
    [ "$(grep -c 'with requested version "' "$work/versions.log")" = "$#" ]
}

consumer() {
    local cxx="$1" prefix="$work/prefix-$1"
    echo "$cxx: consumer (tests/cmake_consumer)"
    # The library alone, as a packager would build it: no tests, a release build, then cmake --install. The
    # kernels with the g++ suite's (and the wheel's) flags and sets: with .ci/ccache.sh's cache, compiled once.
    step "$cxx: configure kdloss (KDLOSS_BUILD_TESTS=OFF)" cmake -S "$root" -B "$work/lib-$cxx" \
        -DCMAKE_BUILD_TYPE=Release -DKDLOSS_WERROR=ON -DCMAKE_CXX_COMPILER="$cxx" -DKDLOSS_BUILD_TESTS=OFF \
        "-DKDLOSS_KERNEL_ISAS=$(runnable_isas)" -DCMAKE_INSTALL_PREFIX="$prefix" || return 0
    step "$cxx: build kdloss (the library's kernels)" cmake --build "$work/lib-$cxx" -j "$jobs" || return 0
    step "$cxx: cmake --install to a prefix" cmake --install "$work/lib-$cxx" || return 0
    step "$cxx: installed tree has headers, library + package files" test -f "$prefix/include/kdloss/kdloss.hpp" \
        -a -f "$prefix/include/kdloss/isa.hpp" -a -n "$(ls "$prefix"/lib*/libkdloss.a 2>/dev/null)" \
        -a -f "$prefix/share/cmake/kdloss/kdlossConfig.cmake" \
        -a -f "$prefix/share/cmake/kdloss/kdlossConfigVersion.cmake" \
        -a -f "$prefix/share/cmake/kdloss/kdlossTargets.cmake" || true

    # Two hosts of the same main.cpp: a release build (-O3, warnings as errors) of kdloss::kdloss found with
    # find_package in the installed prefix, as a packager's user has it; and kdloss::header_only added with
    # add_subdirectory at -O0, since what that way adds is CMake's (the subproject's targets, include path, C++17,
    # threads), and -O0 compiles the kernels in a fifth of -O3's time. (README's test command builds the
    # header-only one too: tests/python/test_cmake_consumer.py.)
    local target mode type flags
    for target in kdloss header_only; do
        if [ "$target" = kdloss ]; then
            mode=find_package type=Release flags="$warnings"
        else
            mode=add_subdirectory type="" flags="-O0 $warnings"
        fi
        local build="$work/consumer-$cxx-$target"
        step "$cxx: consumer of kdloss::$target via $mode: configure" cmake -S "$root/tests/cmake_consumer" \
            -B "$build" -DCMAKE_BUILD_TYPE="$type" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" \
            -DKDLOSS_CONSUMER_MODE="$mode" -DKDLOSS_CONSUMER_TARGET="kdloss::$target" \
            -DCMAKE_PREFIX_PATH="$prefix" -DKDLOSS_SOURCE_TREE="$root" || continue
        step "$cxx: consumer of kdloss::$target via $mode: build (${type:--O0} -Werror)" \
            cmake --build "$build" -j "$jobs" || continue
        step "$cxx: consumer of kdloss::$target via $mode: run, loss = $check_loss" run_consumer "$build" ||
            continue
        summary+=("$cxx consumer of kdloss::$target via $mode: $(head -n 1 "$build/out.txt")")
    done
    # The same program from the same headers, one way and the other: the same numbers, to a few ulps.
    step "$cxx: kdloss::kdloss via find_package and kdloss::header_only via add_subdirectory print the same" \
        agree "$work/consumer-$cxx-kdloss/out.txt" "$work/consumer-$cxx-header_only/out.txt" || true
    # Before 1.0, 0.1 is compatible with 0.1.x only: asking for 0.2 or 0.0 must be refused.
    step "$cxx: find_package(kdloss 0.2), (kdloss 0.0) refused" refuses_versions "$prefix" 0.2 0.0 || true
}

# --- two lanes ------------------------------------------------------------------------------------
# Most of a suite's time goes into one process (the unity translation unit; under qemu, one long test), so
# one suite at a time left a core idle. Two lanes of suites run at once, of about the same CPU time each
# (seconds of CPU when this was written, on 2 cores beside .ci/run's Python side: lane 1, aarch64 180 to
# build and 210 to run under qemu, then g++ plain ~120 with its kernels cached, ~350 without; lane 2,
# sanitized 160 + 100 with clang++, portable 110 + 30 with clang++ (the library for each set), the consumer ~30
# cached). The g++ suite and the consumer come after others: by then the wheel that .ci/run builds first has cached
# the kernels they share with it. Each lane's report is printed when both are done.
# lane NAME JOB...: runs each JOB (a command line: "suite CXX MODE", "consumer CXX") in turn, its report in
# $work/lane.NAME and its counts and summary lines in $work/lane.NAME.result.
lane() {
    local name="$1" job words
    shift
    passed=0 failed=0 summary=()
    for job in "$@"; do
        read -r -a words <<<"$job"
        "${words[@]}" || failed=$((failed + 1))  # they count their own failures and go on; this is a backstop
    done >"$work/lane.$name" 2>&1
    printf '%s\n' "$passed $failed" "${summary[@]}" >"$work/lane.$name.result"
}

# The portable suite with clang++, which compiles its unrolled loops in a third of g++'s time.
portable_cxx=g++
if [[ " ${compilers[*]} " == *" clang++ "* ]]; then portable_cxx=clang++; fi
lane1=() lane2=()
if [ "$aarch64" = 1 ]; then lane1+=("suite aarch64-linux-gnu-g++ aarch64"); fi
lane1+=("suite g++ plain")
lane2+=("suite $sanitized_cxx sanitized" "suite $portable_cxx portable")
# The host's view, with the default compiler (the suites have compiled every header with each).
lane2+=("consumer g++")
lane 1 "${lane1[@]}" &
lane1_pid=$!
lane 2 "${lane2[@]}" &
lane2_pid=$!
wait "$lane1_pid" || true  # a lane that stopped early is found below, by its missing result
wait "$lane2_pid" || true

passed=0 failed=0 summary=()
for name in 2 1; do
    cat "$work/lane.$name"
    if [ ! -f "$work/lane.$name.result" ]; then
        echo "  FAIL  lane $name stopped before its end"
        failed=$((failed + 1))
        continue
    fi
    { read -r lane_passed lane_failed; mapfile -t lane_summary; } <"$work/lane.$name.result"
    passed=$((passed + lane_passed)) failed=$((failed + lane_failed))
    summary+=("${lane_summary[@]}")
done

echo
echo "== C++ tests: summary ($((SECONDS - start)) s) =="
for line in "${summary[@]}"; do echo "  $line"; done
echo "cpp-tests: $passed passed, $failed failed"
[ "$failed" = 0 ]
