"""Mutation check: does the fast suite catch realistic one-line bugs?

Each mutant is an exact string replacement in one source file. The script copies the worktree's files (tracked
and untracked, not ignored) to a temporary directory, makes Python import ``par_deploy`` and its subpackages
from that copy (a ``sitecustomize`` on ``PYTHONPATH``, so subprocesses spawned by tests import it too), then
for each mutant: applies it to the copy, runs the fast suite there with ``-x`` and a timeout, restores the
file. The worktree itself is never modified.

    .venv/bin/python scripts/mutate.py                      # every mutant; baseline run of the clean copy first
    .venv/bin/python scripts/mutate.py --list
    .venv/bin/python scripts/mutate.py --only state-std --tests tests/test_spec.py --no-baseline

A mutant whose target string is not found (the file moved or was rewritten) is reported as skipped; its
``files`` are glob patterns, so a module that becomes a package is still searched. Grow the list whenever a
real bug is found. Not run by CI: a full run takes tens of minutes of one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the targeted tests first, so that -x stops early on a caught mutant; then every other test file
FIRST = (
    "tests/test_spec.py",
    "tests/test_train_serve.py",
    "tests/test_mask.py",
    "tests/test_kernels.py",
    "tests/test_diffusion.py",
    "tests/test_runtime.py",
    "tests/test_export.py",
)


def default_tests(root: Path) -> list[str]:
    """The fast suite's files, ``FIRST`` first (pytest keeps the order of explicit file arguments, but not of a
    directory given after them)."""
    rest = sorted(p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py"))
    return [*FIRST, *(f for f in rest if f not in FIRST)]


@dataclass(frozen=True)
class Mutant:
    name: str
    files: tuple[str, ...]  # glob patterns relative to the root; the target must occur once in exactly one file
    old: str
    new: str
    why: str


def _m(name, files, old, new, why):
    return Mutant(name, (files,) if isinstance(files, str) else tuple(files), old, new, why)


EVAL = ("par_deploy/eval/*.py",)
MUTANTS = [
    # -- normalisation ----------------------------------------------------------------------------------
    _m(
        "state-std",
        "par_deploy/normalize.py",
        "return ((s - self.state_mean) / std).astype(np.float32)",
        "return (s - self.state_mean).astype(np.float32)",
        "issue #15 bug 1: state not divided by its std",
    ),
    _m(
        "action-scale",
        "par_deploy/normalize.py",
        "out = (a - center) / half",
        "out = (a - center) * half",
        "actions multiplied by the half-range instead of divided",
    ),
    _m(
        "denorm-center",
        "par_deploy/normalize.py",
        "return (a * half + center).astype(np.float32)",
        "return (a * half - center).astype(np.float32)",
        "denormalisation subtracts the centre",
    ),
    _m(
        "constant-dim",
        "par_deploy/normalize.py",
        "half = np.where((self.action_max - self.action_min) / 2 > _EPS, half, 0.0)",
        "half = np.where((self.action_max - self.action_min) / 2 > _EPS, half, 1.0)",
        "a dimension without spread (gripper) maps back to constant + sample (a real past bug)",
    ),
    _m(
        "fit-var",
        "par_deploy/normalize.py",
        "mean, std = states.mean(0), states.std(0)",
        "mean, std = states.mean(0), states.var(0)",
        "statistics fitted with the variance as std",
    ),
    # -- runtime ----------------------------------------------------------------------------------------
    _m(
        "feedback-units",
        "par_deploy/runtime/policy.py",
        "self._prev_chunk[:] = self.normalizer.normalize_action(out)",
        "self._prev_chunk[:] = out",
        "issue #15 bug 2: previous chunk fed back in controller units",
    ),
    _m(
        "executed-units",
        "par_deploy/runtime/policy.py",
        "return self.normalizer.normalize_action(executed)",
        "return executed",
        "an executed chunk fed back in controller units",
    ),
    _m(
        "no-clip",
        "par_deploy/runtime/policy.py",
        "chunk = np.clip(chunk, -1.0, 1.0).astype(np.float32)",
        "chunk = chunk.astype(np.float32)",
        "issue #15 bug 5: act() does not clip to the trained range",
    ),
    _m(
        "runtime-state-raw",
        "par_deploy/runtime/policy.py",
        "state = check_state_range(self.normalizer.normalize_state(state))",
        "state = check_state_range(state.astype(np.float32))",
        "runtime feeds the raw state",
    ),
    _m(
        "boa-off-by-one",
        "par_deploy/runtime/policy.py",
        "block = (rgb, state, prev.copy(), self._step == 0)",
        "block = (rgb, state, prev.copy(), self._step <= 1)",
        "BOA also at the second step",
    ),
    _m(
        "slot-no-text",
        "par_deploy/config.py",
        "return self.num_text_tokens + block * self.block_len",
        "return block * self.block_len",
        "blocks written over the text prefix (PARConfig.block_slot: model, exporter and engines)",
    ),
    _m(
        "ort-first-block-slot",
        "par_deploy/runtime/onnx_policy.py",
        "s = self.slot(step)  #",
        "s = self.slot(0)  #",
        "ONNX runner writes every block into the first slot",
    ),
    _m(
        "hash-prefix",
        "par_deploy/runtime/bundle.py",
        'sha256_file(path) != entry["sha256"]',
        'sha256_file(path)[:16] != entry["sha256"][:16]',
        "issue #15 bug 6: only a digest prefix compared",
    ),
    _m(
        "ckpt-hash-prefix",
        "par_deploy/runtime/bundle.py",
        'if digest != manifest["checkpoint_hash"]:',
        'if digest[:12] != manifest["checkpoint_hash"][:12]:',
        "checkpoint digest compared by its printed prefix",
    ),
    # -- model ------------------------------------------------------------------------------------------
    _m(
        "rope-action-base",
        "par_deploy/model/rope.py",
        "inv_freq(cfg.rope_theta_action, hd)",
        "inv_freq(cfg.rope_theta_frame, hd)",
        "issue #15 bug 3: action tokens rotated with the frame base",
    ),
    _m(
        "rope-action-offset",
        "par_deploy/model/rope.py",
        "torch.where(is_act, cfg.chunk_len, 1)",
        "torch.where(is_act, 0, 1)",
        "issue #15 bug 4: action positions lose the block offset (n*L + j -> j)",
    ),
    _m(
        "rope-q-only",
        "par_deploy/model/transformer.py",
        "q, k = apply_rope(q, *rope), apply_rope(k, *rope)",
        "q, k = apply_rope(q, *rope), k",
        "keys not rotated",
    ),
    _m(
        "mask-action-self",
        "par_deploy/model/layout.py",
        "((qk == ACT) & (kk == ACT) & (ki <= qi))",
        "((qk == ACT) & (kk == ACT) & (ki < qi))",
        "an action token does not attend to itself",
    ),
    _m(
        "cond-frame-part",
        "par_deploy/model/par.py",
        "return self.split_block(h_block)[1]",
        "return self.split_block(h_block)[0]",
        "Action-DiT conditioned on the frame part",
    ),
    _m(
        "cache-mask-inclusive",
        "kernels/attention.py",
        "past = (slots < start)",
        "past = (slots <= start)",
        "the new block sees a stale cache slot",
    ),
    _m(
        "sampler-no-clip",
        "kernels/sampler.py",
        "x0 = (coeffs[0] * x - coeffs[1] * eps).clamp(-clip, clip)",
        "x0 = coeffs[0] * x - coeffs[1] * eps",
        "sampler's x0 not clipped",
    ),
    _m(
        "q-sample-noise",
        "par_deploy/model/diffusion.py",
        "return a.sqrt() * x0 + (1 - a).sqrt() * noise",
        "return a.sqrt() * x0 + (1 - a) * noise",
        "forward process with the variance as noise scale",
    ),
    # -- export -----------------------------------------------------------------------------------------
    _m(
        "graph-frame-part",
        "export/graphs.py",
        "frame_hidden, _ = m.split_block(h)",
        "_, frame_hidden = m.split_block(h)",
        "step graph outputs the action part as frame hidden states",
    ),
    _m(
        "denoise-first-t",
        "export/graphs.py",
        "t = self.timesteps.index_select(0, k)  # [1]",
        "t = self.timesteps.index_select(0, k * 0)  # [1]",
        "loop sampler bakes the first timestep for every step",
    ),
    _m(
        "prefix-first-instruction",
        "export/bundler.py",
        "model.prefill(model.text([instruction]), cache)",
        "model.prefill(model.text([model.cfg.instructions[0]]), cache)",
        "every instruction gets the first prefix",
    ),
    _m(
        "manifest-stale-std",
        "export/bundler.py",
        '"normalization": normalizer.to_dict(),',
        '"normalization": {**normalizer.to_dict(), "state_std": [1.0] * normalizer.state_dim},',
        "bundle written with wrong state statistics",
    ),
    _m(
        "parity-ignores-cond",
        "export/parity.py",
        "passed = all(diffs[k] <= tol[k] for k in tol)",
        'passed = all(diffs[k] <= tol[k] for k in tol if k != "cond")',
        "export parity verdict ignores the Action-DiT condition",
    ),
    # -- evaluation -------------------------------------------------------------------------------------
    _m(
        "wilson-center",
        EVAL,
        "center = (p + z * z / (2 * n)) / denom",
        "center = (p + z * z / (4 * n)) / denom",
        "Wilson interval centre",
    ),
    _m(
        "wilson-half",
        EVAL,
        "half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom",
        "half = z * math.sqrt(p * (1 - p) / n) / denom",
        "Wald half-width inside the Wilson interval",
    ),
    _m(
        "newcombe-sign",
        EVAL,
        "d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)",
        "d - math.sqrt((p1 - l1) ** 2 + (p2 - l2) ** 2)",
        "Newcombe interval uses the wrong side of p2",
    ),
]


def project_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True, capture_output=True
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


SITECUSTOMIZE = '''\
"""Written by scripts/mutate.py: import the project's packages from the mutation copy."""
import importlib.machinery
import importlib.util
import sys

_MAP = {mapping!r}


class _CopyFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _MAP:
            return None
        init = _MAP[fullname] + "/__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[_MAP[fullname]])


sys.meta_path.insert(0, _CopyFinder)
'''


def make_copy(root: Path, work: Path) -> tuple[Path, dict[str, str]]:
    """Copy the project to ``work/src``; write a sitecustomize into ``work/site``; return (copy, env)."""
    src = work / "src"
    for f in project_files(root):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, src / f)
    pkg_dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapping = {pkg: str(src / d) for pkg, d in pkg_dirs.items()}
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(mapping=mapping))
    env = {**os.environ, "PYTHONPATH": str(work / "site"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import par_deploy.export, par_deploy.runtime.policy as p; "
            "print(p.__file__); print(par_deploy.export.__file__)",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(p).is_relative_to(src) for p in probe):
        raise SystemExit(f"the copy is not what Python imports: {probe}")
    return src, env


def locate(mutant: Mutant, src: Path) -> Path | None:
    """The one file the mutant's target occurs in (exactly once); None if it occurs nowhere."""
    hits = []
    for pattern in mutant.files:
        for path in sorted(src.glob(pattern)):
            n = path.read_text().count(mutant.old)
            if n > 1:
                raise SystemExit(f"mutant {mutant.name}: target occurs {n} times in {path.relative_to(src)}")
            if n == 1:
                hits.append(path)
    if len(hits) > 1:
        raise SystemExit(f"mutant {mutant.name}: target found in several files {hits}")
    return hits[0] if hits else None


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_suite(src: Path, env: dict[str, str], tests: list[str], timeout: float) -> tuple[str, float, float, str]:
    """Run pytest -x in the copy; returns (passed|failed|timeout|error, wall seconds, CPU seconds of the run and its
    subprocesses, the first failure line)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0, c0 = time.monotonic(), _child_cpu()
    proc = subprocess.Popen(
        cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        # pytest exits 1 when a test failed; anything else (a signal, an internal or usage error) is not a verdict
        status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started (pytest and its workers)
        out, _ = proc.communicate()
        status = "timeout"
    return status, time.monotonic() - t0, _child_cpu() - c0, _failure_summary(out)


def _failure_summary(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return (lines[0] if lines else (out.strip().splitlines() or [""])[-1])[:200]


def run_mutant(m: Mutant, src: Path, env: dict[str, str], tests: list[str], timeout: float) -> dict:
    path = locate(m, src)
    if path is None:
        return {"name": m.name, "status": "skipped", "why": m.why, "detail": "target string not found"}
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new))
    try:
        status, seconds, _, detail = run_suite(src, env, tests, timeout)
    finally:
        path.write_text(original)
    verdict = {"failed": "caught", "timeout": "caught (timeout)", "passed": "survived", "error": "error"}[status]
    return {
        "name": m.name,
        "file": str(path.relative_to(src)),
        "status": verdict,
        "seconds": round(seconds, 1),
        "why": m.why,
        "detail": detail,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--tests",
        nargs="+",
        default=default_tests(ROOT),
        help="pytest arguments (default: the fast suite's files, targeted ones first)",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per suite run (default 900)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants {sorted(unknown)}")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:26s} {m.files[0]:34s} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="par-mutate-") as tmp:
        src, env = make_copy(ROOT, Path(tmp))
        if not args.no_baseline:
            status, seconds, cpu, detail = run_suite(src, env, args.tests, args.timeout)
            print(f"baseline (no mutant): {status} in {seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
            if status != "passed":
                print(f"the unmutated suite does not pass ({detail}); fix that first", file=sys.stderr)
                return 2
        results = []
        for m in mutants:
            r = run_mutant(m, src, env, args.tests, args.timeout)
            results.append(r)
            print(f"{r['status']:17s} {m.name:26s} {r.get('seconds', 0):6.1f} s  {r['detail']}", flush=True)
    ran = [r for r in results if r["status"] not in ("skipped", "error")]  # errors are reported, not counted
    caught = [r for r in ran if r["status"].startswith("caught")]
    skipped = len(results) - len(ran)
    rate = len(caught) / len(ran) if ran else float("nan")
    print(
        f"\n{len(caught)}/{len(ran)} caught ({100 * rate:.0f}%), {skipped} skipped or errored; survived: "
        f"{[r['name'] for r in ran if r['status'] == 'survived']}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"caught": len(caught), "ran": len(ran), "skipped": skipped, "tests": args.tests, "results": results},
                indent=2,
            )
            + "\n"
        )
    return 0 if ran and rate >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
