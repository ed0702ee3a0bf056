import json
import re

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
    result = runner.invoke(
        app,
        [
            "export",
            str(ckpt),
            "--out",
            str(out),
            "--backend",
            "onnx",
            "--backend",
            "torchscript",
            "--denoise-steps",
            "2",
            "--report-json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    data = json.loads(report.read_text())
    assert data["denoise_steps"] == 2 and set(data["parity"]) == {"onnx", "torchscript"}
    assert all(p["passed"] for p in data["parity"].values())


def test_export_of_a_conv_stem_model_passes_parity(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", frame_embed="conv", num_cameras=2)
    result = runner.invoke(
        app,
        [
            "export",
            str(ckpt),
            "--out",
            str(tmp_path / "b"),
            "--denoise-steps",
            "2",
            "--report-json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["parity"]["onnx"]["passed"]


@pytest.fixture
def no_shipped(tmp_path, monkeypatch):
    from par_deploy import locate

    monkeypatch.setattr(locate, "CHECKPOINTS_ROOT", tmp_path / "checkpoints")
    monkeypatch.setattr(locate, "BUNDLES_ROOT", tmp_path / "bundles")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--task", "StackCube"], "error: no shipped checkpoint for StackCube"),
        (["bench", "--task", "StackCube"], "error: no shipped checkpoint for StackCube"),
        (["eval", "--task", "Foo"], "error: unknown task 'Foo'; known tasks: PushCube, PickCube, StackCube"),
        (["eval", "--checkpoint", "missing-ckpt", "--workers", "0"], "error: missing-ckpt: not a checkpoint directory"),
        (["eval", "--states", "10", "--episodes", "60"], "error: --episodes 60 is more than --states 10 x 5 seeds"),
    ],
)
def test_eval_and_bench_errors_are_one_line_exit_2(no_shipped, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    if "no shipped checkpoint" in message:
        assert "tasks with one: none" in lines[0] and f"par-deploy train data/{args[2]}" in lines[0]


def test_eval_help_says_how_states_seeds_and_episodes_compose():
    text = " ".join(runner.invoke(app, ["eval", "--help"]).output.replace("│", " ").split())  # rich's boxes
    assert "episodes = states x seeds" in text and "--states 125 --seeds 0" in text
    assert "reset with seed SEED_BASE + i" in text


STEP_OPTIONS = {  # each kind of step has its own option name
    "demo": "--control-steps",
    "train": "--optimizer-steps",
    "render": "--frame-ddim-steps",
    "eval": "--denoise-steps",
    "export": "--denoise-steps",
}


@pytest.mark.parametrize("command", sorted(STEP_OPTIONS))
def test_step_options_are_named_by_kind(command):
    out = runner.invoke(app, [command, "--help"], terminal_width=200).output
    assert STEP_OPTIONS[command] in out and not re.search(r"(?<![\w-])--steps\b", out)  # the old spelling: hidden


def test_old_steps_spelling_still_works_with_a_warning(tmp_path):
    missing = str(tmp_path / "missing")
    result = runner.invoke(app, ["demo", "--checkpoint", missing, "--steps", "1"])
    assert "warning: --steps is deprecated here; use --control-steps" in result.output
    assert result.exit_code == 2 and "missing" in result.output  # then it runs as --control-steps 1 would
    result = runner.invoke(app, ["demo", "--checkpoint", missing, "--steps", "1", "--control-steps", "2"])
    assert result.exit_code == 2 and "same option" in result.output
    # the new spelling given at its default value still counts as given (it used to lose to the old one)
    for args in (
        ["demo", "--control-steps", "0", "--steps", "5"],
        ["train", "d", "--out", "o", "--optimizer-steps", "3000", "--steps", "5"],
        ["eval", "--max-env-steps", "10", "--max-steps", "5"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "same option" in result.output, args
