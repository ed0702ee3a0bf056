"""Deployment bundles: the manifest format, the graph signatures, and verified loading (numpy only, no torch).

A bundle is a directory written by ``par_deploy.export.export_bundle``::

    manifest.json      format + version, source checkpoint hash, model config, graph signatures, cache
                       sizes, sampler (kind, K, baked timesteps and coefficients), precision, engine files
                       with sha256, normalisation statistics, export parity report
    text_prefix.npz    the text-prefix keys/values of every instruction of the config (``k``, ``v``:
                       ``[instructions, layers, 1, heads, K_t, head_dim]``), copied into the cache by
                       ``reset``
    onnx/*.onnx        ONNX graphs (ONNX Runtime backend, and the source the TensorRT engines are built from)
    torchscript/*.pt   TorchScript modules (``torch.jit.load``, or libtorch's ``torch::jit::load``)
    tensorrt/*.plan    serialized TensorRT engines (built on the target GPU)

Graphs (all shapes static; ``B`` = the manifest's ``batch``: B independent episodes, one per row, 1 unless
exported with ``--batch``):

- ``step``: ``rgb`` uint8 ``[B,V,H,W,3]``, ``state`` float32 ``[B,S]`` (absent when ``state_dim == 0``),
  ``prev_actions`` float32 ``[B,L,A]`` (normalised), ``first`` bool ``[B]`` (BOA block), ``pos`` int64 ``[B]``
  (each row's block index), ``cache_k_0 .. cache_k_{layers-1}``, ``cache_v_0 ..`` float32 ``[B,H,S,hd]`` (one
  input per layer, read only: the host binds views of its ``[layers,B,H,S,hd]`` buffers, so the graph never
  splits or concatenates the cache) -> ``action_cond`` ``[B,L,D]``, ``frame_hidden`` ``[B,K_o,D]``,
  ``new_k``/``new_v`` ``[layers,B,H,Bl,hd]``. The host writes row b of ``new_k``/``new_v`` into its cache at
  slots ``K_t + pos[b] * Bl ..``.
- sampler, ``"unrolled"`` form: ``sampler``: ``noise`` ``[K+1,B,L,A]``, ``action_cond`` ``[B,L,D]`` (the step's
  output, one name end to end) -> ``actions`` ``[B,L,A]`` (the K denoiser calls unrolled, schedule constants
  baked in).
- sampler, ``"loop"`` form: ``condition``: ``action_cond`` -> ``cond_k``/``cond_v``
  ``[dit_depth,B,dit_heads,L,dit_hd]`` (cross-attention keys/values, once per control step) and
  ``denoise``: ``x`` ``[B,L,A]``, ``k`` int64 ``[1]`` (step index into the baked schedule), ``z`` ``[B,L,A]``,
  ``cond_k``, ``cond_v`` -> ``x_next`` ``[B,L,A]``, called K times by the runner.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy.config import PARConfig, check_format_version
from par_deploy.errors import CheckpointError, ConfigError, ParError
from par_deploy.files import atomic_write, checkpoint_hash, sha256_file
from par_deploy.normalize import Normalizer
from par_deploy.runtime.policy import PolicySpec

BUNDLE_FORMAT = "par-deploy-bundle"
# Format 2: the sampler/condition graphs' input is ``action_cond`` (format 1 called it ``cond``); format 3: one
# step-graph cache input per layer (``cache_k_i`` / ``cache_v_i``) and a batch dimension (manifest ``batch``).
# Older formats are refused with a re-export hint (bundles are build output).
BUNDLE_FORMAT_VERSION = 3
MAX_BATCH = 256  # episodes per engine call (a sanity bound on --batch)
MANIFEST_FILE = "manifest.json"
TEXT_PREFIX_FILE = "text_prefix.npz"
BACKENDS = ("onnx", "torchscript", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # int8: ONNX Runtime (par_deploy.export.precision)
SAMPLER_GRAPHS = ("unrolled", "loop")
UNROLL_MAX_STEPS = 16  # larger K uses the condition + denoise-step loop (export time and graph size grow with K)
ENGINE_DIRS = {"onnx": "onnx", "torchscript": "torchscript", "tensorrt": "tensorrt"}
ENGINE_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "tensorrt": ".plan"}


class BundleError(ParError):
    """A bundle is missing a file, was modified, or does not match its manifest or the expected model."""


class BackendUnavailable(ParError):
    """The requested backend cannot run here (package missing, no CUDA device, unsupported precision)."""


# ---------------------------------------------------------------------------------------------------------
# graph signatures


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "uint8", "float32", "int64", "bool"
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name!r} has no tensor {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(
            name,
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


def cache_layout(cfg: PARConfig) -> dict[str, int]:
    """The static KV-cache sizes a manifest records (and loading checks against the config)."""
    return {
        "layers": cfg.depth,
        "heads": cfg.heads,
        "head_dim": cfg.dim // cfg.heads,
        "max_blocks": cfg.max_blocks,
        "max_slots": cfg.max_seq_len,
        "text_slots": cfg.num_text_tokens,
        "block_len": cfg.block_len,
    }


def text_prefix_shape(cfg: PARConfig) -> tuple[int, ...]:
    """``[instructions, layers, 1, heads, K_t, head_dim]``: the text-prefix keys (or values) a bundle stores."""
    return (len(cfg.instructions), *cfg.cache_shape()[:3], cfg.num_text_tokens, cfg.dim // cfg.heads)


def layer_cache_names(kind: str, layers: int) -> list[str]:
    """Step-graph input names of one cache (``kind`` ``"k"`` or ``"v"``): ``cache_k_0 .. cache_k_{layers-1}``."""
    return [f"cache_{kind}_{i}" for i in range(layers)]


def check_batch(batch: object) -> int:
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"batch must be an integer in [1, {MAX_BATCH}] (episodes per engine call), got {batch!r}")
    return batch


def graph_specs(cfg: PARConfig, steps: int, sampler_graph: str, batch: int = 1) -> dict[str, GraphSpec]:
    """The signatures of every graph a bundle holds, derived from the config and the batch alone."""
    if sampler_graph not in SAMPLER_GRAPHS:
        raise ConfigError(f"sampler graph must be one of {SAMPLER_GRAPHS}, got {sampler_graph!r}")
    B = check_batch(batch)
    L, A, D, hd = cfg.chunk_len, cfg.action_dim, cfg.dim, cfg.dim // cfg.heads
    layer = cfg.cache_shape(B)[1:]
    delta = (cfg.depth, B, cfg.heads, cfg.block_len, hd)
    step_in = [TensorSpec("rgb", "uint8", (B, cfg.num_cameras, cfg.image_size, cfg.image_size, 3))]
    if cfg.state_dim:
        step_in.append(TensorSpec("state", "float32", (B, cfg.state_dim)))
    step_in += [
        TensorSpec("prev_actions", "float32", (B, L, A)),
        TensorSpec("first", "bool", (B,)),
        TensorSpec("pos", "int64", (B,)),
    ]
    step_in += [TensorSpec(n, "float32", layer) for kind in "kv" for n in layer_cache_names(kind, cfg.depth)]
    step_out = (
        TensorSpec("action_cond", "float32", (B, L, D)),
        TensorSpec("frame_hidden", "float32", (B, cfg.frame_tokens, D)),
        TensorSpec("new_k", "float32", delta),
        TensorSpec("new_v", "float32", delta),
    )
    specs = {"step": GraphSpec("step", tuple(step_in), step_out)}
    cond = step_out[0]  # the sampler reads the step's action_cond
    x = TensorSpec("x", "float32", (B, L, A))
    if sampler_graph == "unrolled":
        specs["sampler"] = GraphSpec(
            "sampler",
            (TensorSpec("noise", "float32", (steps + 1, B, L, A)), cond),
            (TensorSpec("actions", "float32", (B, L, A)),),
        )
    else:
        ckv = (cfg.dit_depth, B, cfg.dit_heads, L, cfg.dit_dim // cfg.dit_heads)
        ck, cv = TensorSpec("cond_k", "float32", ckv), TensorSpec("cond_v", "float32", ckv)
        specs["condition"] = GraphSpec("condition", (cond,), (ck, cv))
        specs["denoise"] = GraphSpec(
            "denoise",
            (x, TensorSpec("k", "int64", (1,)), TensorSpec("z", "float32", (B, L, A)), ck, cv),
            (TensorSpec("x_next", "float32", (B, L, A)),),
        )
    return specs


def tensorrt_profiles(manifest: dict[str, Any]) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """TensorRT optimisation profiles from the manifest: ``{graph: {input: (min, opt, max)}}``.

    Every shape is static, so min = opt = max = the manifest's shape (one profile per engine).
    """
    return {g: {t["name"]: (tuple(t["shape"]),) * 3 for t in spec["inputs"]} for g, spec in manifest["graphs"].items()}


# ---------------------------------------------------------------------------------------------------------
# files and hashes


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a reader never sees a half-written manifest)."""
    atomic_write(root / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def file_entry(root: Path, path: Path) -> dict[str, Any]:
    return {
        "file": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


# ---------------------------------------------------------------------------------------------------------
# verified bundle


@dataclass
class Bundle:
    """A bundle directory whose manifest, files and hashes were checked (see ``open_bundle``)."""

    path: Path
    manifest: dict[str, Any]
    config: PARConfig
    normalizer: Normalizer
    graphs: dict[str, GraphSpec]
    _prefix: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def spec(self) -> PolicySpec:
        return PolicySpec.from_config(self.config)

    @property
    def steps(self) -> int:
        return int(self.manifest["sampler"]["steps"])

    @property
    def sampler_graph(self) -> str:
        return self.manifest["sampler"]["graph"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def batch(self) -> int:
        """Independent episodes per engine call (``par-deploy export --batch``)."""
        return int(self.manifest.get("batch", 1))

    def require_one_episode(self) -> None:
        """Refuse a batched bundle where one episode per call is expected (``BundleError`` names the fix)."""
        if self.batch != 1:
            raise BundleError(
                f"{self.path}: this bundle runs {self.batch} episodes per engine call; load it with "
                "par_deploy.runtime.load_batch (BatchPolicy.act_batch), or export with --batch 1"
            )

    def prefix(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """Text-prefix keys/values ``[layers, 1, H, K_t, hd]`` of one instruction."""
        k, v = self.text_prefix()
        i = list(self.config.instructions).index(instruction)
        return k[i], v[i]

    def engine_path(self, backend: str, graph: str) -> Path:
        try:
            return self.path / self.manifest["engines"][backend][graph]["file"]
        except KeyError:
            raise BundleError(
                f"{self.path / MANIFEST_FILE}: no {backend} engine for graph {graph!r}; re-export the bundle"
            ) from None

    def text_prefix(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values ``[instructions, layers, 1, heads, K_t, head_dim]`` (float32), loaded once."""
        if self._prefix is None:
            path = self.path / self.manifest["text_prefix"]["file"]
            try:
                with np.load(path, allow_pickle=False) as z:
                    k, v = z["k"].astype(np.float32), z["v"].astype(np.float32)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise BundleError(
                    f"{path}: unreadable text prefix ({type(e).__name__}: {e}); re-export the bundle"
                ) from None
            expected = text_prefix_shape(self.config)
            for name, a in (("k", k), ("v", v)):
                if a.shape != expected:
                    raise BundleError(
                        f"{path}: text-prefix {name} has shape {a.shape}, the manifest's config expects "
                        f"{expected}; "
                        "the file belongs to another model"
                    )
            self._prefix = (k, v)
        return self._prefix


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and structurally check ``manifest.json`` (format name and version); no file hashes."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: not a bundle directory (expected {MANIFEST_FILE} and engine files)")
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing bundle manifest; export the bundle with par_deploy.export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BundleError(f"{path}: not a par-deploy bundle manifest (format {found!r}, expected {BUNDLE_FORMAT!r})")
    version = check_format_version(
        m.get("format_version"), BUNDLE_FORMAT_VERSION, str(path), BundleError, " or re-export the bundle"
    )
    if version < BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format_version {version} is older than this par-deploy reads ({BUNDLE_FORMAT_VERSION}: "
            "graph I/O names and the step's cache inputs changed); re-export the bundle from its checkpoint "
            "(par-deploy export CKPT --out DIR --overwrite)"
        )
    required = (
        "checkpoint_hash",
        "config",
        "precision",
        "backends",
        "sampler",
        "cache",
        "graphs",
        "engines",
        "text_prefix",
        "normalization",
    )
    missing = [k for k in required if k not in m]
    if missing:
        raise BundleError(f"{path}: manifest lacks the fields {missing}; re-export the bundle")
    return m


def check_source_checkpoint(bundle_dir: str | Path, manifest: dict[str, Any], checkpoint: str | Path) -> None:
    """``BundleError`` unless the bundle was exported from the checkpoint directory ``checkpoint`` (its sha256,
    ``par_deploy.files.checkpoint_hash``, against the manifest's ``checkpoint_hash``)."""
    mpath = Path(bundle_dir) / MANIFEST_FILE
    try:
        digest = checkpoint_hash(checkpoint)
    except CheckpointError as e:
        raise BundleError(f"{e}; cannot check which checkpoint the bundle {bundle_dir} was built from") from None
    if digest != manifest["checkpoint_hash"]:
        raise BundleError(
            f"{mpath}: bundle was exported from checkpoint {manifest['checkpoint_hash'][:12]}..., not from "
            f"{checkpoint} ({digest[:12]}...); export a bundle from this checkpoint"
        )


def _verify_file(root: Path, entry: dict[str, Any], what: str) -> None:
    path = root / entry["file"]
    if not path.is_file():
        raise BundleError(f"{path}: missing {what} listed in {MANIFEST_FILE}")
    size = path.stat().st_size
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise BundleError(
            f"{path}: {what} does not match the sha256 recorded in {MANIFEST_FILE} (modified, truncated, or "
            "copied from another bundle); re-export the bundle"
        )


def open_bundle(bundle_dir: str | Path, backend: str | None = None, checkpoint: str | Path | None = None) -> Bundle:
    """Verify a bundle and return it.

    Checks: manifest format and version; the config parses and the manifest's cache sizes and graph signatures
    are the ones this config implies; the text prefix and (for ``backend``) every engine file exist and match
    their sha256; with ``checkpoint``, that the bundle was exported from that checkpoint directory.
    Raises ``BundleError`` naming the offending file.
    """
    root = Path(bundle_dir)
    m = read_manifest(root)
    mpath = root / MANIFEST_FILE
    try:
        cfg = PARConfig.from_dict(m["config"], source=f"{mpath}: config")
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{mpath}: invalid model config ({e})") from None
    if checkpoint is not None:
        check_source_checkpoint(root, m, checkpoint)
    sampler = m["sampler"]
    if sampler.get("graph") not in SAMPLER_GRAPHS:
        raise BundleError(f"{mpath}: unknown sampler graph {sampler.get('graph')!r}")
    if m["precision"] not in PRECISIONS:
        raise BundleError(f"{mpath}: unknown precision {m['precision']!r}")
    try:
        expected = graph_specs(cfg, int(sampler["steps"]), sampler["graph"], m.get("batch", 1))
    except ConfigError as e:
        raise BundleError(f"{mpath}: {e}") from None
    found = {name: GraphSpec.from_dict(name, d) for name, d in m["graphs"].items()}
    if found != expected:
        raise BundleError(
            f"{mpath}: graph signatures {sorted(found)} do not match the model config in the same manifest "
            "(edited manifest, or engines for another model); re-export the bundle"
        )
    cache = m["cache"]
    want_cache = cache_layout(cfg)
    bad = {k: cache.get(k) for k, v in want_cache.items() if cache.get(k) != v}
    if bad:
        raise BundleError(f"{mpath}: cache sizes {bad} disagree with the model config {want_cache}")
    if cache.get("overflow") != cfg.overflow:
        raise BundleError(
            f"{mpath}: cache overflow policy {cache.get('overflow')!r} disagrees with the model config's "
            f"{cfg.overflow!r}; re-export the bundle"
        )
    if len(sampler.get("timesteps", [])) != sampler["steps"] or len(sampler.get("coeffs", [])) != sampler["steps"]:
        raise BundleError(f"{mpath}: sampler timesteps/coefficients do not have {sampler['steps']} entries")
    if list(m["text_prefix"].get("instructions", [])) != list(cfg.instructions):
        raise BundleError(f"{mpath}: text prefix instructions differ from the config's instructions")
    try:
        normalizer = Normalizer.from_dict(m["normalization"], source=f"{mpath}: normalization")
    except (ParError, ValueError) as e:
        raise BundleError(str(e)) from None
    if normalizer.action_dim != cfg.action_dim or normalizer.state_dim != cfg.state_dim:
        raise BundleError(f"{mpath}: normalisation statistics do not match action_dim/state_dim of the config")
    _verify_file(root, m["text_prefix"], "text prefix")
    if backend is not None:
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if backend not in m["backends"]:
            raise BundleError(
                f"{mpath}: the bundle has no {backend} engines (it has: "
                f"{', '.join(m['backends']) or 'none'}); "
                f"export it with backends=(..., {backend!r})"
                + (" or build them with python -m par_deploy.export.tensorrt" if backend == "tensorrt" else "")
            )
        verify_engine_files(root, m, backend)
    return Bundle(root, m, cfg, normalizer, expected)


def verify_engine_files(root: Path, manifest: dict[str, Any], backend: str) -> None:
    """Every engine file of ``backend`` (one per graph, plus external data) exists and matches its sha256."""
    mpath = root / MANIFEST_FILE
    engines = manifest["engines"].get(backend) or {}
    if set(engines) != set(manifest["graphs"]):
        raise BundleError(f"{mpath}: {backend} engines {sorted(engines)} != graphs {sorted(manifest['graphs'])}")
    for graph, entry in engines.items():
        _verify_file(root, entry, f"{backend} engine for graph {graph!r}")
        for extra in entry.get("external_data", []):
            _verify_file(root, extra, f"external data of the {backend} {graph!r} graph")


def check_io(path: Path, graph: GraphSpec, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Compare an engine's own input/output signature with the manifest's; ``BundleError`` names the file."""
    for kind, want, got in (("inputs", graph.inputs, inputs), ("outputs", graph.outputs, outputs)):
        want_d = {t.name: t for t in want}
        got_d = {t.name: t for t in got}
        if set(want_d) != set(got_d):
            raise BundleError(
                f"{path}: engine {kind} {sorted(got_d)} differ from the manifest's {sorted(want_d)} for "
                f"graph {graph.name!r}; the file belongs to another model or export"
            )
        for name, t in want_d.items():
            g = got_d[name]
            if g.shape != t.shape or g.dtype != t.dtype:
                raise BundleError(
                    f"{path}: {kind[:-1]} {name!r} is {g.dtype}{list(g.shape)}, the manifest expects "
                    f"{t.dtype}{list(t.shape)}; the file belongs to another model or config"
                )
