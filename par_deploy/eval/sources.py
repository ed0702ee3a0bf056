"""What is evaluated: picklable descriptions of a policy that a worker turns into a ``Policy``.

A source implements four things (``PolicySource``): ``info()`` (the policy's inputs/outputs and the task and
controller it was trained for, read without loading it), ``identity()`` (what makes two evaluations of it the
same; a results file resumes only for the same identity), ``load()`` (the ``par_deploy.runtime.Policy`` a
worker runs) and ``threads``. ``CheckpointSource`` is the PyTorch reference of a checkpoint,
``EngineSource`` a bundle through the runtime. A remote policy plugs in the same way: a frozen dataclass
``ServerSource(url)`` whose ``info`` (``SourceInfo.from_config`` of the spec the server reports) and
``identity`` (its checkpoint hash, sampler and K) come from the server, and whose ``load`` returns the client
``Policy``; ``run_eval`` then needs one more option to build it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from par_deploy.config import PARConfig
from par_deploy.errors import ParError
from par_deploy.eval.protocol import EvalError
from par_deploy.runtime.policy import PolicySpec


@dataclass(frozen=True)
class SourceInfo:
    """A policy's interface and training task, known before it is loaded."""

    spec: PolicySpec
    task: str | None  # the task it was trained on (None: unknown)
    control_mode: str | None  # the controller of its training actions (None: unknown)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config") -> SourceInfo:
        """From a model config dict (``config.json`` or a bundle manifest's ``config``); ``source`` names it in
        errors."""
        config = PARConfig.from_dict(cfg, source=source)
        task = config.task_info
        return cls(PolicySpec.from_config(config), task.task, task.control_mode)


class PolicySource(ABC):
    """A policy to evaluate (see the module docstring). Subclasses are frozen dataclasses (picklable)."""

    label: str = "policy"
    threads: int = 1

    @property
    def batch(self) -> int:
        """Episodes per policy call: 1, or N for a batched engine (whose ``load`` returns a ``BatchPolicy``)."""
        return 1

    @abstractmethod
    def info(self) -> SourceInfo: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def load(self):
        """The ``Policy`` (called once per worker)."""

    @property
    def name(self) -> str:
        """How messages name it (a path or address)."""
        return str(getattr(self, "path", self.label))

    def describe(self) -> dict[str, Any]:
        """Identity plus where it was loaded from, for the results file (no machine path)."""
        from par_deploy.locate import portable_path

        path = getattr(self, "path", None)
        return {**self.identity(), "path": portable_path(path) if path else None, "threads": self.threads}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read ({e})") from None


@dataclass(frozen=True)
class CheckpointSource(PolicySource):
    """The PyTorch reference (``TorchPolicy``) of a checkpoint directory; ``sampler`` / ``steps`` default to the
    checkpoint's own."""

    path: str
    sampler: str | None = None
    steps: int | None = None
    threads: int = 1
    label = "reference"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))

    def config(self) -> dict[str, Any]:
        path = Path(self.path)
        if not (path / "config.json").is_file():
            raise EvalError(f"{path}: not a checkpoint directory (no config.json)")
        return _read_json(path / "config.json")

    def info(self) -> SourceInfo:
        return SourceInfo.from_config(self.config(), source=str(Path(self.path) / "config.json"))

    def identity(self) -> dict[str, Any]:
        from par_deploy.files import checkpoint_hash

        cfg = self.config()
        return {
            "kind": "checkpoint",
            "checkpoint_hash": checkpoint_hash(self.path),
            "sampler": self.sampler or cfg["sampler"],
            "steps": int(self.steps or cfg["sample_steps"]),
        }

    def load(self):
        import torch

        from par_deploy.reference import TorchPolicy

        torch.set_num_threads(self.threads)
        return TorchPolicy.from_pretrained(self.path, sampler=self.sampler, steps=self.steps)


@dataclass(frozen=True)
class EngineSource(PolicySource):
    """A bundle loaded with ``par_deploy.runtime.load(path, backend)`` (no torch, no export stack)."""

    path: str
    backend: str = "onnx"
    threads: int = 1
    label = "engine"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))

    def manifest(self) -> dict[str, Any]:
        from par_deploy.runtime.bundle import read_manifest

        return read_manifest(self.path)

    def info(self) -> SourceInfo:
        return SourceInfo.from_config(self.manifest()["config"], source=f"{Path(self.path) / 'manifest.json'}: config")

    def identity(self) -> dict[str, Any]:
        m = self.manifest()
        batch = {"batch": int(m["batch"])} if m.get("batch", 1) > 1 else {}  # batch-1 results keep their identity
        return {
            "kind": "engine",
            "checkpoint_hash": m["checkpoint_hash"],
            "backend": self.backend,
            "precision": m["precision"],
            "sampler": m["sampler"]["kind"],
            "steps": int(m["sampler"]["steps"]),
            **batch,
        }

    @property
    def batch(self) -> int:
        return int(self.manifest().get("batch", 1))

    def load(self):
        """``runtime.load`` (a ``Policy``), or ``runtime.load_batch`` (a ``BatchPolicy``) for a batched bundle."""
        from par_deploy.runtime import load, load_batch

        if self.batch > 1:
            if self.backend != "onnx":
                raise EvalError(f"{self.path}: batched bundles run on ONNX Runtime; pass --backend onnx")
            return load_batch(self.path, threads=self.threads)
        return load(self.path, backend=self.backend, threads=self.threads)


@dataclass(frozen=True)
class ServerSource(PolicySource):
    """A policy served by ``par-deploy serve`` and driven through ``par_deploy.client.RemotePolicy``: the
    simulator runs here, the policy on the server. Each worker opens its own connection (one episode each), so
    start the server with ``--max-clients`` >= ``--workers``."""

    url: str
    threads: int = 1
    label = "server"

    def hello(self) -> dict[str, Any]:
        from par_deploy.client import RemotePolicy

        try:
            with RemotePolicy(self.url) as remote:
                return dict(remote.info)
        except ParError as e:
            raise EvalError(str(e)) from None

    @property
    def name(self) -> str:
        return self.url

    def info(self) -> SourceInfo:
        from par_deploy.serve.protocol import spec_from_dict

        hello = self.hello()
        return SourceInfo(spec_from_dict(hello.get("spec")), hello.get("task"), hello.get("control_mode"))

    def identity(self) -> dict[str, Any]:
        h = self.hello()  # the same engine as in-process: results resume and compare across the two
        return {
            "kind": "engine",
            "checkpoint_hash": h.get("checkpoint_hash"),
            "backend": h.get("backend"),
            "precision": h.get("precision"),
            "sampler": h.get("sampler"),
            "steps": int(h["denoise_steps"]),
        }

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "server": self.url, "path": None, "threads": self.threads}

    def load(self):
        from par_deploy.client import RemotePolicy

        return RemotePolicy(self.url)


def reference_for(engine: EngineSource, checkpoint: str | os.PathLike | None = None) -> CheckpointSource:
    """The PyTorch reference of an engine bundle, with the bundle's sampler and K (so both draw the same noise).

    ``checkpoint`` defaults to the bundle's source checkpoint (``par_deploy.locate.source_checkpoint``); it must
    be the checkpoint the bundle was exported from (same sha256)."""
    from par_deploy.locate import source_checkpoint
    from par_deploy.runtime.bundle import check_source_checkpoint

    m = engine.manifest()
    try:
        checkpoint = checkpoint if checkpoint is not None else source_checkpoint(engine.path, m)
        check_source_checkpoint(engine.path, m, checkpoint)  # the rule bench and runtime.load(checkpoint=) use
    except ParError as e:
        raise EvalError(f"{e} (a comparison with it would be meaningless)") from None
    return CheckpointSource(
        str(checkpoint), sampler=m["sampler"]["kind"], steps=int(m["sampler"]["steps"]), threads=engine.threads
    )
