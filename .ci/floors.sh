#!/usr/bin/env bash
# The floors job: install every dependency (and the dev extra) at the minimum version pyproject.toml declares
# (">=X" -> "==X"), in a venv of its own, and run the fast tests (not slow, not gpu). A floor that the code cannot run on fails
# here. Run it from anywhere: `make floors` or `bash .ci/floors.sh`.
#
#   PY=python3.10 bash .ci/floors.sh        # another interpreter
#   FLOORS_VENV=/tmp/floors bash .ci/floors.sh
#   PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" bash .ci/floors.sh   # CPU torch wheels
#
# Without a CPU index, pip takes torch from PyPI, which on Linux x86-64 is the CUDA build (~3 GB with its
# nvidia-* wheels); it runs on a CPU-only machine all the same. numpy and the other indirect dependencies are
# resolved by pip (newest compatible), as a user's install would be.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${FLOORS_VENV:-.venv-floors}
PIP_EXTRA=${PIP_EXTRA:-}

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" - > "$VENV/floors.txt" <<'PYEOF'
import re
import tomllib

project = tomllib.loads(open("pyproject.toml").read())["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;<\s]*)\s*", req)
    if m is None:
        raise SystemExit(f"pyproject.toml: {req!r} has no plain '>=' floor; fix: write it as name>=X")
    print(f"{m[1]}=={m[3]}")  # a constraints file takes no extras (dask[distributed] pins distributed itself)
PYEOF
echo "floors ($VENV/floors.txt):"
sed 's/^/  /' "$VENV/floors.txt"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $PIP_EXTRA -c "$VENV/floors.txt" -e ".[dev]"
echo "installed:"
"$VENV/bin/python" -m pip freeze | grep -i -E "^($(cut -d= -f1 "$VENV/floors.txt" | paste -sd'|')|numpy)==" | sed 's/^/  /'
"$VENV/bin/python" -m pytest -q -m "not slow and not gpu" -p no:cacheprovider "$@"
