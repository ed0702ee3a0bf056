"""Learning curve of a training run: success of every saved checkpoint on a fixed set of unseen initial states.

    python scripts/learning_curve.py RUN_DIR --task PushCube --states 20 --json docs/curves/NAME.json

For each ``RUN_DIR/checkpoints/step_*`` (and ``final``) this runs ``par-deploy eval`` with the PyTorch reference
on initial states ``env.reset(seed=500000 + i)``, i < ``--states``, one policy seed, stopping each episode at
its first success, and records the training wall and CPU time at that step (from the run's ``metrics.jsonl``). The JSON
is written after every checkpoint and is also the resume file: a finished checkpoint is not evaluated again.
``--plot`` draws success against training CPU time for one or more such JSON files (the recipe comparison in
docs/recipe.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from par_deploy.files import atomic_write


def metrics_up_to(run: Path, step: int) -> list[dict]:
    """The run's ``metrics.jsonl`` records logged at or before ``step`` (empty when there is none)."""
    metrics = run / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return [r for r in recs if r["step"] <= step]


def cpu_time_at(run: Path, step: int) -> float | None:
    """Training CPU seconds up to ``step`` (``cpu_s`` of the run's metrics; None for runs that do not log it)."""
    recs = [r for r in metrics_up_to(run, step) if "cpu_s" in r]
    return float(recs[-1]["cpu_s"]) * step / recs[-1]["step"] if recs else None


def wall_time_at(run: Path, step: int) -> float | None:
    """Training wall seconds up to ``step``: ``elapsed_s`` when the run logs it, else batch size x step / rate."""
    recs = metrics_up_to(run, step)
    if not recs:
        return None
    last = recs[-1]
    if "elapsed_s" in last:
        return float(last["elapsed_s"]) * step / last["step"]
    batch = json.loads((run / "train_config.json").read_text())["batch_size"]
    return step * batch / float(last["episodes_per_s"])


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("_")[1]), p) for p in sorted((run / "checkpoints").glob("step_*"))]
    return sorted(found)


def evaluate_checkpoint(ckpt: Path, task: str, states: int, threads: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [
            "par-deploy",
            "eval",
            "--task",
            task,
            "--checkpoint",
            str(ckpt),
            "--episodes",
            str(states),
            "--seeds",
            "0",
            "--stop-on-success",
            "--threads",
            str(threads),
            "--workers",
            str(workers),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        doc = json.loads(out.read_text())
    once = next(iter(doc["runs"].values()))["summary"]["success_once"]
    return {"successes": int(once["successes"]), "episodes": int(once["n"])}


def run_curve(run: Path, task: str, states: int, out: Path, threads: int, workers: int, every: int) -> dict:
    doc = (
        json.loads(out.read_text())
        if out.exists()
        else {"run": run.name, "task": task, "states": states, "seed_base": 500000, "points": []}
    )
    done = {p["step"] for p in doc["points"]}
    for step, ckpt in checkpoints(run):
        if step in done or step % every:
            continue
        res = evaluate_checkpoint(ckpt, task, states, threads, workers)
        doc["points"].append({"step": step, "wall_s": wall_time_at(run, step), "cpu_s": cpu_time_at(run, step), **res})
        doc["points"].sort(key=lambda p: p["step"])
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(doc, indent=1) + "\n")
        print(f"{run.name} step {step}: {res['successes']}/{res['episodes']}", flush=True)
    return doc


def plot(curves: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(curves):
        doc = json.loads(c.read_text())
        pts = [p for p in doc["points"] if p.get("cpu_s") is not None]
        ax.plot(
            [p["cpu_s"] / 60 for p in pts],
            [100 * p["successes"] / p["episodes"] for p in pts],
            "o-" if i < 10 else "s--",  # the colour cycle has 10 colours
            label=doc.get("label", doc["run"]),
        )
    ax.set_xlabel("training CPU time, one thread [min]")
    ax.set_ylabel(f"success_once on {doc['states']} unseen states [%]")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8)  # below the axes: never over a curve
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, nargs="?", help="training run directory")
    ap.add_argument("--task", default="PushCube")
    ap.add_argument("--states", type=int, default=20)
    ap.add_argument("--json", type=Path, help="curve JSON to write (and resume)")
    ap.add_argument("--every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--plot", type=Path, help="PNG of success vs training CPU time for the --curves files")
    ap.add_argument("--curves", type=Path, nargs="*", default=[])
    a = ap.parse_args(argv)
    if a.run is not None:
        if a.json is None:
            ap.error("--json is required with a run directory")
        run_curve(a.run, a.task, a.states, a.json, a.threads, a.workers, a.every)
    if a.plot is not None:
        plot(a.curves or [a.json], a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
