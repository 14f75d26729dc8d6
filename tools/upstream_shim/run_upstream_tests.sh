#!/usr/bin/env bash
# Run upstream gradience 0.11.0's own audit tests against gradience_lite through
# the rename-only shim in this folder (never part of the package):
#
#   tools/upstream_shim/run_upstream_tests.sh PYTHON [pytest args]
#
# PYTHON needs what upstream's tests use to build their inputs: torch,
# safetensors, numpy, pytest (e.g. /work/venv-tools/bin/python).  The sdist is
# downloaded from PyPI into a temporary folder; the selected test files are run
# from a copy outside it, so `import gradience` finds the shim, not upstream.
set -euo pipefail
SHIM="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$SHIM/../.." && pwd)"
PY="${1:?usage: run_upstream_tests.sh PYTHON [pytest args]}"; shift
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

(cd "$WORK" && "$PY" -m pip download --quiet --no-deps --no-binary :all: gradience==0.11.0 >/dev/null \
  && tar xzf gradience-0.11.0.tar.gz)
UPSTREAM="$WORK/gradience-0.11.0/tests"
mkdir -p "$WORK/run/tests" "$WORK/bin"
cp "$UPSTREAM"/test_{audit_json_invariants,cli_commands,udr_integration_simple,udr_correctness,error_paths,dependency_split,suggest_per_layer_flag,per_layer_suggestions_invariants,rank_policies,gain_metrics}.py "$WORK/run/tests/"
# Upstream's CLI tests call a `gradience` executable: the same entry point as `gradience-lite`.
"$PY" - "$WORK/bin/gradience" "$PY" "$SHIM" "$ROOT" <<'PYEOF'
import os, sys
target, python, shim, root = sys.argv[1:]
with open(target, "w") as out:
    out.write(f"#!{python}\nimport sys\nsys.path[:0] = [{shim!r}, {root!r}]\n"
              "from gradience_lite import main\nsys.exit(main())\n")
os.chmod(target, 0o755)
PYEOF

cd "$WORK/run"
# The audit's tests; other commands (check, monitor, merge-audit, truncate) and the
# bench harness are not gradience_lite's and are not selected.  test_udr_integration.py
# is left out: it downloads sshleifer/tiny-gpt2 from the hub.
PATH="$WORK/bin:$PATH" PYTHONPATH="$SHIM:$ROOT" "$PY" -m pytest -p no:cacheprovider -q -rfEs --tb=line --continue-on-collection-errors \
  tests/test_audit_json_invariants.py \
  tests/test_cli_commands.py::TestAuditCommand \
  tests/test_cli_commands.py::TestHelpAndVersion::test_help_exits_zero \
  tests/test_cli_commands.py::TestHelpAndVersion::test_no_args_prints_help \
  tests/test_udr_integration_simple.py \
  tests/test_udr_correctness.py \
  tests/test_error_paths.py::TestLoraAuditErrors \
  tests/test_dependency_split.py::TestCoreDependencyBoundary::test_import_lora_audit_no_bench_deps \
  tests/test_suggest_per_layer_flag.py \
  tests/test_per_layer_suggestions_invariants.py \
  tests/test_rank_policies.py \
  tests/test_gain_metrics.py \
  "$@"
