import json

import pytest
from typer.testing import CliRunner

from par_deploy.cli import app
from tests.test_bench import tiny_checkpoint

runner = CliRunner()
COMMANDS = ["info", "demo", "demos", "train", "render", "slim", "export", "bench", "eval"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_info_prints_paper_counts():
    result = runner.invoke(app, ["info", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert "608.41M" in result.output and "608.7M" in result.output  # NOVA blocks: README "The model"


def test_export_command_writes_a_bundle_and_report(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out, report = tmp_path / "bundle", tmp_path / "report.json"
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(out), "--backend", "onnx", "--backend",
                                 "torchscript", "--denoise-steps", "2", "--report-json", str(report)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    data = json.loads(report.read_text())
    assert data["denoise_steps"] == 2 and set(data["parity"]) == {"onnx", "torchscript"}
    assert all(p["passed"] for p in data["parity"].values())


def test_export_of_a_conv_stem_model_passes_parity(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", frame_embed="conv", num_cameras=2)
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "b"), "--denoise-steps", "2",
                                 "--report-json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["parity"]["onnx"]["passed"]
