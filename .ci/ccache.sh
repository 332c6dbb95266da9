# Sourced by .ci/run: one compiler cache (ccache) for every build of the run. The kernels are most of the
# compile time, and three builds compile them with the same command lines: the wheel of README's test command,
# the wheel that tests/packaging/check_dist.sh builds from the sdist, and .ci/cpp-tests.sh's g++ suite and
# library. Cached, they compile once; nothing else changes (a compiler's warnings and errors are never cached).
#
# A command line names the sources by absolute paths, which differ between the checkout and the unpacked sdist:
# with CCACHE_BASEDIR set to the checkout, ccache makes the paths under it relative to the build directory, and
# each of those builds keeps its build directory three levels below its source tree (build/ci/wheel,
# build/ci-cpp.*/build-g++-plain), so the relative paths agree. The sdist is unpacked under the checkout for that
# (.ci/run gives check_dist.sh a TMPDIR there). The system's headers stay absolute: a base directory above them
# would make their paths relative too, and then differ with the depth of each tree.
#
# Without ccache (no apt-get as root, or Debian's package not reachable), every build compiles in full: slower,
# the same results.
if ! command -v ccache >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { timeout 45 apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive timeout 90 apt-get install -y -qq --no-install-recommends ccache; } \
        >/dev/null 2>&1 || true
fi
if command -v ccache >/dev/null; then
    CCACHE_DIR="$(mktemp -d)"
    export CCACHE_DIR CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
    export CMAKE_CXX_COMPILER_LAUNCHER=ccache  # CMake's default for every project configured from here on
    echo "compiler cache: $(ccache --version | head -n 1) in $CCACHE_DIR"
else
    echo "compiler cache: no ccache here; every build compiles in full"
fi
