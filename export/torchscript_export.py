"""TorchScript export of the graph modules (``torch.jit.trace``; the saved ``.pt`` loads in libtorch)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from par_deploy.export.errors import ExportError
from par_deploy.runtime.bundle import GraphSpec


def _max_diff(a, b) -> float:
    a = a if isinstance(a, tuple | list) else (a,)
    b = b if isinstance(b, tuple | list) else (b,)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def export_torchscript(
    module: nn.Module,
    spec: GraphSpec,
    args: tuple[torch.Tensor, ...],
    check_args: tuple[torch.Tensor, ...],
    path: Path,
    freeze: bool = True,
) -> list[Path]:
    """Trace ``module`` on ``args`` and save it to ``path``.

    Tracing records one execution: anything data-dependent that is not a tensor op is baked in
    (docs/design-notes.md §3). The traced module is therefore re-checked against the eager module on
    ``check_args`` (other positions and values); a difference above 1e-4 raises ``ExportError``. ``freeze``
    inlines weights as constants (``torch.jit.freeze``), which lets TorchScript fold them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(module, args, check_trace=False)
            if freeze:
                traced = torch.jit.freeze(traced.eval())
        except Exception as e:  # tracing raises many exception types; name the graph
            raise ExportError(f"TorchScript trace of graph {spec.name!r} failed: {type(e).__name__}: {e}") from e
        diff = _max_diff(traced(*check_args), module(*check_args))
    if not diff <= 1e-4:
        raise ExportError(
            f"TorchScript trace of graph {spec.name!r} differs from the eager module by {diff:.3g} on inputs "
            "it was not traced with (a value was baked in as a constant)"
        )
    torch.jit.save(traced, str(path))
    return [path]
