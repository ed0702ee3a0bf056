#!/usr/bin/env bash
# Set up this machine for par-deploy: torch (the CPU build that lies on disk, never a multi-GB CUDA build),
# the package itself (editable) with its dev tools, and the ManiSkill3 simulator with its Vulkan driver.
# Idempotent and quiet when already done.  Environment: PYTHON (default python), SKIP_SIM=1 to skip the
# simulator (scripts/setup_sim.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
log() { printf '[setup] %s\n' "$*"; }

# 1. torch: the CPU wheel of torch 2.13.0 ships on this kind of machine; ask for it by exact version first so
#    that resolving the project's `torch>=2.4` later installs nothing.
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    log "pip install torch==2.13.0 (CPU build)"
    "$PYTHON" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    "$PYTHON" -c 'import torch' || { echo "[setup] ERROR: torch did not install" >&2; exit 1; }
fi
TORCH_PIN="torch==$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"

# 2. par-deploy (editable) + dev tools; skipped when the installed one already points at this checkout and every
#    requirement of pyproject.toml (dependencies + the dev extra) is installed at a version it accepts.
if ! "$PYTHON" - <<'PY' 2>/dev/null; then
import importlib.metadata as md, pathlib, sys, tomllib
from packaging.requirements import Requirement
import par_deploy
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
for req in map(Requirement, project["dependencies"] + project["optional-dependencies"]["dev"]):
    if not req.specifier.contains(md.version(req.name), prereleases=True):
        sys.exit(1)
want = pathlib.Path("par_deploy").resolve()
sys.exit(0 if pathlib.Path(par_deploy.__file__).resolve().parent == want and md.version("par-deploy") else 1)
PY
    log "pip install -e .[dev] ($TORCH_PIN kept)"
    "$PYTHON" -m pip install -q -e ".[dev]" "$TORCH_PIN" 2>&1 | grep -v "^WARNING: Location" || true
    "$PYTHON" -c 'import par_deploy.cli' || { echo "[setup] ERROR: par-deploy did not install" >&2; exit 1; }
fi

# 3. the simulator (Vulkan driver from Debian backports, mani-skill, numpy<2): see scripts/setup_sim.sh.
if [ "${SKIP_SIM:-0}" != 1 ]; then
    PYTHON="$PYTHON" bash scripts/setup_sim.sh
fi
