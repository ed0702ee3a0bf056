"""``python -m par_deploy.export CHECKPOINT OUT_DIR [options]``: export a checkpoint to a bundle."""

from __future__ import annotations

import argparse
import json
import sys

from par_deploy.errors import ParError
from par_deploy.export.bundler import export_bundle
from par_deploy.export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS
from par_deploy.runtime.bundle import BACKENDS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m par_deploy.export", description=export_bundle.__doc__.split("\n")[0]
    )
    p.add_argument("checkpoint", help="checkpoint directory (save_pretrained layout)")
    p.add_argument("out_dir", help="bundle directory to create")
    p.add_argument("--backends", default="onnx", help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--denoise-steps", type=int, default=4, help="K: Action-DiT denoiser calls per chunk")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--sampler-graph", choices=("auto", "unrolled", "loop"), default="auto")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--onnx-exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--parity-steps", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in out_dir")
    p.add_argument("--report-json", default=None, help="also write the export report here")
    a = p.parse_args(argv)
    try:
        report = export_bundle(
            a.checkpoint,
            a.out_dir,
            backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()),
            denoise_steps=a.denoise_steps,
            sampler=a.sampler,
            precision=a.precision,
            sampler_graph=a.sampler_graph,
            onnx_exporter=a.onnx_exporter,
            opset=a.opset,
            parity_steps=a.parity_steps,
            overwrite=a.overwrite,
        )
    except (ParError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.report_json:
        with open(a.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
