"""The results file: one JSON document per evaluation, written atomically after every episode.

Running again with the same file resumes it: episodes recorded for the same protocol and policy are kept
and skipped (crashed ones are re-run); a file written for another protocol, policy or format version is refused
(``EvalMismatch``) naming the differing fields. Nothing in it is a machine path: paths are relative to the
working directory, the command line's program is its name.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from par_deploy.eval.episode import EpisodeRecord
from par_deploy.eval.protocol import EpisodeJob, EvalMismatch
from par_deploy.eval.stats import summarize
from par_deploy.files import atomic_write

FORMAT = "par-eval"
VERSION = 2  # 2: episodes isolated (a fresh environment each); 1's results depended on the worker's history
_ENV_VARS = ("OMP_NUM_THREADS", "LP_NUM_THREADS", "PAR_THREADS", "VK_ICD_FILENAMES", "CUDA_VISIBLE_DEVICES")


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("par-deploy", "numpy", "torch", "onnxruntime", "mani-skill", "sapien"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    env = {k: os.environ.get(k) for k in _ENV_VARS}
    if env["VK_ICD_FILENAMES"]:
        env["VK_ICD_FILENAMES"] = os.pathsep.join(Path(p).name for p in env["VK_ICD_FILENAMES"].split(os.pathsep))
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "loadavg": load,
        "python": sys.version.split()[0],
        "packages": versions,
        "env": env,
    }


def portable_argv(argv: Sequence[str]) -> list[str]:
    """The command line without machine paths: the program's name, absolute paths made relative."""
    from par_deploy.locate import portable_path

    if not argv:
        return []
    return [Path(argv[0]).name] + [portable_path(a) if os.path.isabs(a) else a for a in argv[1:]]


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=1) + "\n")


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} in the file vs {new.get(k)!r} now" for k in keys)


def _read_results(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalMismatch(
            f"{path}: exists but is not a readable results file ({e}); move it or use another --json"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise EvalMismatch(f"{path}: not a par-deploy evaluation file (format {fmt!r}); use another --json path")
    if doc.get("version") != VERSION:
        raise EvalMismatch(
            f"{path}: results format version {doc.get('version')!r}, this par-deploy writes "
            f"{VERSION} (episodes isolated since version 2); use another --json path"
        )
    return doc


def load_resume(
    path: str | os.PathLike | None, protocol: dict[str, Any], policies: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The results document to continue: a new one, or ``path``'s after checking that it was written for the
    same protocol and, for each label in ``policies``, the same policy identity (else ``EvalMismatch``)."""
    if path is None or not Path(path).exists():
        return {"format": FORMAT, "version": VERSION, "protocol": protocol, "runs": {}, "compare": None}
    path = Path(path)
    doc = _read_results(path)
    if doc.get("protocol") != protocol:
        raise EvalMismatch(
            f"{path} was written for another evaluation protocol ({_diff(doc['protocol'], protocol)});"
            " use another --json path to keep both"
        )
    for label, identity in policies.items():
        run = doc.get("runs", {}).get(label)
        if run is not None and run.get("policy") != identity:
            raise EvalMismatch(
                f"{path}: its {label!r} run evaluated another policy "
                f"({_diff(run.get('policy') or {}, identity)}); use another --json path"
            )
    doc.setdefault("runs", {})
    return doc


def completed(doc: dict[str, Any], label: str) -> dict[tuple[int, int], EpisodeRecord]:
    """Episodes of run ``label`` already recorded, by (state, policy seed); crashed ones are not (re-run them)."""
    run = doc.get("runs", {}).get(label) or {}
    records = (EpisodeRecord.from_dict(r) for r in run.get("episodes", []))
    return {r.key: r for r in records if not r.crashed}


@dataclass
class RunResult:
    label: str
    policy: dict[str, Any]
    episodes: list[EpisodeRecord]
    summary: dict[str, Any]
    wall_seconds: float


@dataclass
class EvalResult:
    task: str
    protocol: dict[str, Any]
    runs: dict[str, RunResult]
    compare: dict[str, Any] | None = None
    json_path: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # episodes taken from the results file, per run
    policy_note: str | None = None  # which checkpoint and bundle were resolved for the task, when they were

    @property
    def main(self) -> RunResult:
        return next(iter(self.runs.values()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunBook:
    """The records of one run inside the results document; saves the document after every episode."""

    def __init__(
        self,
        doc: dict[str, Any],
        label: str,
        identity: dict[str, Any],
        described: dict[str, Any],
        jobs: Sequence[EpisodeJob],
        json_path: Path | None,
    ):
        self.doc, self.label, self.json_path = doc, label, json_path
        self.run = doc["runs"].setdefault(label, {"policy": identity, "episodes": [], "wall_seconds": 0.0})
        self.run["source"] = described
        self.by_key = completed(doc, label)  # crashed episodes are dropped here and re-run
        self.wanted = {j.key for j in jobs}
        self.total = len(jobs)
        self.todo = [j for j in jobs if j.key not in self.by_key]
        self._wall0, self._t0 = float(self.run.get("wall_seconds", 0.0)), time.perf_counter()

    def records(self) -> list[EpisodeRecord]:
        """This evaluation's episodes (a longer earlier run may hold more), in protocol order."""
        return sorted((r for k, r in self.by_key.items() if k in self.wanted), key=lambda r: r.index)

    def add(self, record: EpisodeRecord) -> None:
        self.by_key[record.key] = record
        self.save()

    def save(self) -> None:
        self.run["episodes"] = [r.to_dict() for r in sorted(self.by_key.values(), key=lambda r: r.index)]
        self.run["summary"] = summarize(self.records())
        self.run["wall_seconds"] = self._wall0 + time.perf_counter() - self._t0
        if self.json_path is not None:
            self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(self.json_path, self.doc)

    def result(self) -> RunResult:
        return RunResult(self.label, self.run["policy"], self.records(), self.run["summary"], self.run["wall_seconds"])
