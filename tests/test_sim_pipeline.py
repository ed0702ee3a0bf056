"""The README flow end to end on the tiny preset: demos -> train -> export -> eval, in the real simulator."""

import json

import pytest
from typer.testing import CliRunner

from par_deploy.cli import app

pytestmark = pytest.mark.sim
runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_demos_train_export_eval(tmp_path):
    data, runs, bundle = tmp_path / "data", tmp_path / "run", tmp_path / "bundle"
    out = run("demos", "--task", "PushCube", "-n", 2, "--out", data, "--seed", 300)
    assert "kept 2" in out
    run(
        "train",
        data,
        "--out",
        runs,
        "--preset",
        "tiny",
        "--optimizer-steps",
        3,
        "--batch-size",
        2,
        "--warmup",
        1,
        "--save-every",
        3,
        "--model",
        "patch_size=16",
        "--model",
        "target_pool=4",
    )
    cfg = json.loads((runs / "final" / "config.json").read_text())
    assert cfg["image_size"] == 64 and cfg["state_dim"] == 16 and cfg["extra"]["task"] == "PushCube"
    run("export", runs / "final", "--out", bundle, "--denoise-steps", 2)
    run(
        "eval",
        "--task",
        "PushCube",
        "--engine",
        bundle,
        "--episodes",
        1,
        "--workers",
        0,
        "--max-env-steps",
        16,
        "--json",
        tmp_path / "eval.json",
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = result["runs"]["engine"]["summary"]
    assert summary["episodes"] == 1 and summary["length"]["max"] == 16 and summary["act_ms"]["calls"] == 4
