#!/usr/bin/env bash
# Mutation score of one or more modules against the tests that cover them (a benchmark, not part of CI).
#
#   benchmarks/mutation.sh MODULE [MODULE...] TEST [TEST...]
#   benchmarks/mutation.sh lib/sam_med3d/extension.py tests/test_extension.py tests/test_predictor.py
#
# Arguments under tests/ are the covering tests (files or pytest node ids); the others are the modules to mutate
# (under lib/sam_med3d/ or apps/sam_med3d/lib/). Environment:
#   MUTATION_TIME_LIMIT  seconds for the whole run (default 1800); mutants not reached are reported "not checked"
#   MUTATION_ONLY        space-separated mutmut name globs restricting the run to some functions, e.g.
#                        "sam_med3d.geometry.x_crop_bounds__mutmut_* sam_med3d.geometry.xǁCropǁ*"
#   MUTATION_JOBS        parallel mutant workers (default: number of CPUs)
#   MUTATION_VENV        where the tool is installed (default ~/.cache/sam-med3d-mutation/mutmut-<version>)
#   MUTATION_WORKDIR     scratch copy of the repository (default ${TMPDIR:-/tmp}/sam-med3d-mutation/<modules>)
#   PYTHON               the project's interpreter (default: python on PATH, else .venv/bin/python)
#
# The tool (mutmut, pinned) goes into its own virtual environment that also sees the project's packages; the run
# happens in a scratch copy of the working tree outside the repository, so nothing here is written into git.
# Printed: one row per module (killed / survived / timeout / no tests / not checked / score), then the
# surviving mutants with the command that shows each one's diff.
set -euo pipefail

MUTMUT_VERSION=3.8.1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

modules=()
tests=()
for arg in "$@"; do
    case "$arg" in
        tests/*) tests+=("$arg") ;;
        *) modules+=("$arg") ;;
    esac
done
if [ ${#modules[@]} -eq 0 ] || [ ${#tests[@]} -eq 0 ]; then
    echo "usage: $0 MODULE [MODULE...] TEST [TEST...]   (tests are paths under tests/)" >&2
    exit 2
fi
for m in "${modules[@]}"; do
    case "$m" in
        lib/sam_med3d/*.py | apps/sam_med3d/lib/*.py) ;;
        *) echo "$m: not a module under lib/sam_med3d/ or apps/sam_med3d/lib/" >&2; exit 2 ;;
    esac
    [ -f "$REPO/$m" ] || { echo "$m: no such file in $REPO" >&2; exit 2; }
done
for t in "${tests[@]}"; do
    [ -e "$REPO/${t%%::*}" ] || { echo "$t: no such test file in $REPO" >&2; exit 2; }
done

PY=${PYTHON:-$(command -v python || true)}
[ -n "$PY" ] || PY="$REPO/.venv/bin/python"
"$PY" -c "import torch, pytest" 2>/dev/null || {
    echo "$PY cannot import torch and pytest: activate the project's environment or set PYTHON" >&2; exit 2; }

# The tool's own environment, created from the project's interpreter; a .pth file puts the project's
# site-packages after the tool's own, so the tests import the project's torch/monai while mutmut's
# dependencies cannot replace the project's packages.
VENV=${MUTATION_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sam-med3d-mutation/mutmut-$MUTMUT_VERSION}
if ! "$VENV/bin/python" -c "import mutmut, sys; sys.exit(mutmut.__version__ != '$MUTMUT_VERSION')" 2>/dev/null; then
    echo "installing mutmut==$MUTMUT_VERSION into $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
project_site=$("$PY" -c "import site; print('\n'.join(site.getsitepackages()))")
tool_site=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
{
    while IFS= read -r dir; do
        echo "import site; site.addsitedir('$dir')"
    done <<< "$project_site"
} > "$tool_site/zz_sam_med3d_project.pth"

slug=$(printf '%s\n' "${modules[@]}" | sed 's#.*/##; s#\.py$##' | paste -sd- -)
WORK=${MUTATION_WORKDIR:-${TMPDIR:-/tmp}/sam-med3d-mutation/$slug}
case "$(cd "$(dirname "$WORK")" 2>/dev/null && pwd || dirname "$WORK")/" in
    "$REPO"/*) echo "MUTATION_WORKDIR must be outside the repository ($REPO)" >&2; exit 2 ;;
esac
rm -rf "$WORK"
mkdir -p "$WORK"

# Scratch copy of the working tree (tracked and untracked-but-not-ignored files). mutmut names a mutant after
# its file's path below the source root, so both import roots are laid out under src/: the core package as
# src/sam_med3d (imported as sam_med3d) and the app's lib as src/lib (imported as lib.* with the app folder on
# sys.path). Inside mutants/, lib and apps/sam_med3d/lib are links back to the mutated copies.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) |
    tar -C "$REPO" --null -T - -cf - | tar -C "$WORK" -xf -
mkdir -p "$WORK/src"
mv "$WORK/lib/sam_med3d" "$WORK/src/sam_med3d"
mv "$WORK/apps/sam_med3d/lib" "$WORK/src/lib"
mkdir -p "$WORK/mutants/apps/sam_med3d"
for entry in "$WORK/apps/sam_med3d/"* "$WORK/apps/sam_med3d/".[!.]*; do
    [ -e "$entry" ] && ln -s "$entry" "$WORK/mutants/apps/sam_med3d/$(basename "$entry")"
done
ln -s ../../src/lib "$WORK/mutants/apps/sam_med3d/lib"
ln -s src "$WORK/mutants/lib"
for entry in "$WORK"/*; do
    case "$(basename "$entry")" in
        src | lib | apps | tests | mutants | pyproject.toml | setup.cfg) ;;
        *) ln -s "$entry" "$WORK/mutants/$(basename "$entry")" ;;
    esac
done

src_paths=()
for m in "${modules[@]}"; do
    case "$m" in
        lib/sam_med3d/*) src_paths+=("src/${m#lib/}") ;;
        apps/sam_med3d/lib/*) src_paths+=("src/lib/${m#apps/sam_med3d/lib/}") ;;
    esac
done
{
    echo "[mutmut]"
    echo "source_paths = src"
    echo "only_mutate ="
    printf '    %s\n' "${src_paths[@]}"
    echo "pytest_add_cli_args_test_selection ="
    printf '    %s\n' "${tests[@]}"
    echo "pytest_add_cli_args ="
    echo "    -p"
    echo "    no:cacheprovider"
    # torch is not fork-safe once it has run: workers fork from a clean server process
    echo "process_isolation = forkserver"
    echo "use_git_change_detection = false"
} > "$WORK/setup.cfg"

export SAM_MED3D_SHARED=${SAM_MED3D_SHARED:-$(cd "$REPO/.." && pwd)/shared}
export SAM_MED3D_TEST_THREADS=${SAM_MED3D_TEST_THREADS:-1}
unset PYTHONPATH
LIMIT=${MUTATION_TIME_LIMIT:-1800}
JOBS=${MUTATION_JOBS:-$(nproc)}
read -r -a only <<< "${MUTATION_ONLY:-}"

echo "mutating ${modules[*]} against ${tests[*]} (limit ${LIMIT}s, $JOBS workers) in $WORK"
start=$(date +%s)
set +e
(cd "$WORK" && timeout --signal=INT --kill-after=60 "$LIMIT" \
    "$VENV/bin/mutmut" run --max-children "$JOBS" "${only[@]}") > "$WORK/mutmut.log" 2>&1
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "time limit reached after ${elapsed}s: unreached mutants are counted as not checked"
elif [ $rc -ne 0 ]; then
    echo "mutmut exited with $rc after ${elapsed}s; last lines of $WORK/mutmut.log:" >&2
    tail -n 30 "$WORK/mutmut.log" >&2
fi

(cd "$WORK" && "$VENV/bin/python" - "$elapsed" "${only[@]}" <<'PY'
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

elapsed, patterns = sys.argv[1], sys.argv[2:]
rows, survivors = [], []
for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
    source = str(meta.relative_to("mutants/src"))[: -len(".meta")]
    module = source.replace("lib/", "apps/sam_med3d/lib/", 1) if source.startswith("lib/") else "lib/" + source
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    counts = {}
    for name, code in exit_codes.items():
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        status = status_by_exit_code[code]
        counts[status] = counts.get(status, 0) + 1
        if status in ("survived", "no tests", "suspicious"):
            survivors.append((module, name, status))
    if not counts:
        continue
    detected = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    checked = sum(counts.values()) - counts.get("not checked", 0) - counts.get("skipped", 0)
    rows.append((module, sum(counts.values()), counts.get("killed", 0), counts.get("survived", 0),
                 counts.get("timeout", 0), counts.get("no tests", 0), counts.get("not checked", 0),
                 f"{100 * detected / checked:.1f} %" if checked else "-"))

header = ("module", "mutants", "killed", "survived", "timeout", "no tests", "not checked", "score")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
print(f"\nmutation score ({elapsed} s; score = killed or timed out / checked)")
for row in [header] + rows:
    print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
if survivors:
    print(f"\n{len(survivors)} mutants not killed (diffs in {Path.cwd() / 'survivors.diff'}):")
    with open("survivors.diff", "w") as out:
        for module, name, status in survivors:
            print(f"  {status:10s} {name}")
            shown = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "show", name],
                                   capture_output=True, text=True)
            out.write(f"# {status}: {name} ({module})\n{shown.stdout}\n")
PY
)
