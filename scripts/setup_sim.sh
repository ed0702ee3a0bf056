#!/usr/bin/env bash
# Install what the ManiSkill3 simulator needs on a CPU-only Debian 12 (bookworm) machine, then check it.
#
#   bash scripts/setup_sim.sh
#
# Idempotent: every step checks first and does nothing when already done, so a second run only prints the
# final check line. Steps:
#   1. Vulkan: SAPIEN refuses Debian 12's Mesa 22 lavapipe ("Failed to find a supported physical device
#      cpu"); Mesa >= 25 from the <codename>-backports suite works. The suite is added to the apt source that
#      already lists the Debian mirror (same host, no new repository), then mesa-vulkan-drivers and
#      libvulkan1 are installed from it. Needs root (or sudo).
#   2. pip: mani-skill 3.0.1 with numpy<2 (its pinned mplib 0.1.1 segfaults under numpy 2) and
#      opencv-python<4.12 (newer wheels require numpy 2). torch is named with its installed version so pip
#      never replaces it.
#   3. Check: create PushCube-v1 with RGB observations on the CPU render backend and step it once.
# Environment: PYTHON (default: python), SKIP_APT=1 to skip step 1 (e.g. when Vulkan is provided otherwise).
set -euo pipefail

PYTHON="${PYTHON:-python}"
MESA_MIN_MAJOR=25

log() { printf '[setup_sim] %s\n' "$*"; }
die() { printf '[setup_sim] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@";
    elif command -v sudo >/dev/null 2>&1; then sudo "$@";
    else die "need root for: $*"; fi
}

# Major version of an installed Debian package, or 0 when not installed.
installed_major() {
    local v
    v="$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true)"
    case "$v" in
        "installed "*) v="${v#installed }"; v="${v#*:}"; echo "${v%%.*}" ;;
        *) echo 0 ;;
    esac
}

# Add "<codename>-backports" to the apt source that lists the Debian main archive. Handles deb822 files
# (*.sources, "Suites:" line of the stanza whose URIs end in /debian) and one-line files (sources.list,
# *.list: a new line with the same URI and components).
add_backports_suite() {
    local codename="$1" suite="$1-backports" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [ -f "$f" ] && grep -qE "^[^#]*\b${suite}\b" "$f"; then return 0; fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        if grep -qE '^URIs:.*/debian/?( |$)' "$f"; then
            log "adding suite ${suite} to $f"
            as_root "$PYTHON" - "$f" "$codename" "$suite" <<'PY'
import re
import sys

path, codename, suite = sys.argv[1:]
stanzas = open(path).read().split("\n\n")
for i, st in enumerate(stanzas):
    if re.search(r"^URIs:.*/debian/?(\s|$)", st, re.M) and re.search(rf"^Suites:.*\b{codename}\b", st, re.M):
        stanzas[i] = re.sub(r"^(Suites:.*)$", rf"\1 {suite}", st, count=1, flags=re.M)
        break
else:
    sys.exit(f"no stanza for the Debian archive with suite {codename} in {path}")
open(path, "w").write("\n\n".join(stanzas))
PY
            return 0
        fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        local line
        line="$(grep -E "^deb +(\[[^]]*\] +)?[a-z]+://[^ ]+/debian/? +${codename} " "$f" | head -n1 || true)"
        if [ -n "$line" ]; then
            log "adding suite ${suite} to $f"
            # shellcheck disable=SC2001
            printf '%s\n' "$(sed -E "s/ ${codename} / ${suite} /" <<<"$line")" | as_root tee -a "$f" >/dev/null
            return 0
        fi
    done
    die "no apt source lists the Debian archive for ${codename}; add '${suite}' by hand"
}

setup_vulkan() {
    if [ "${SKIP_APT:-0}" = 1 ]; then return 0; fi
    if [ "$(installed_major mesa-vulkan-drivers)" -ge "$MESA_MIN_MAJOR" ] \
        && [ "$(installed_major libvulkan1)" -ge 1 ]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Mesa >= ${MESA_MIN_MAJOR} lavapipe by hand"
    local codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || die "cannot read VERSION_CODENAME from /etc/os-release"
    add_backports_suite "$codename"
    log "apt-get update"
    as_root apt-get update -qq
    log "installing mesa-vulkan-drivers libvulkan1 from ${codename}-backports"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t "${codename}-backports" mesa-vulkan-drivers libvulkan1 >/dev/null
    local major
    major="$(installed_major mesa-vulkan-drivers)"
    [ "$major" -ge "$MESA_MIN_MAJOR" ] || die "mesa-vulkan-drivers ${major}.x installed; need >= ${MESA_MIN_MAJOR}"
}

setup_pip() {
    if "$PYTHON" - <<'PY' 2>/dev/null; then return 0; fi
import sys
from importlib.metadata import version

import numpy

ok = version("mani-skill") == "3.0.1" and int(numpy.__version__.split(".")[0]) < 2
ok = ok and tuple(int(x) for x in version("opencv-python").split(".")[:2]) < (4, 12)
sys.exit(0 if ok else 1)
PY
    local torch_pin
    torch_pin="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
    log "pip install mani-skill==3.0.1 numpy<2 opencv-python<4.12${torch_pin:+ torch==$torch_pin}"
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --disable-pip-version-check "mani-skill==3.0.1" "numpy<2" "opencv-python<4.12" \
        ${torch_pin:+"torch==$torch_pin"}
}

check_sim() {
    OMP_NUM_THREADS=1 "$PYTHON" - <<'PY'
import sys
import time
import warnings

warnings.filterwarnings("ignore")
t0 = time.time()
try:
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the environments)

    env = gym.make("PushCube-v1", obs_mode="rgb", render_backend="cpu", sim_backend="physx_cpu", num_envs=1)
    env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    shape = tuple(next(iter(obs["sensor_data"].values()))["rgb"].shape)
    env.close()
except Exception as e:  # noqa: BLE001 - report any failure as one line
    print(f"[setup_sim] FAILED: ManiSkill check: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(f"[setup_sim] OK: ManiSkill PushCube-v1 reset+step with rgb {shape} on CPU ({time.time() - t0:.1f} s)")
PY
}

setup_vulkan
setup_pip
check_sim
