import json

import pytest
import torch

from par_deploy.config import CONFIG_FORMAT_VERSION, PARConfig, TaskInfo, preset
from par_deploy.errors import ConfigError
from par_deploy.model.par import PARModel

PAPER_TABLE_1 = {  # millions of parameters, paper Table 1
    "causal_transformer": 608.7,
    "frame_detokenizer": 32.8,
    "action_detokenizer": 21.1,
    "action_tokenizer": 0.6,
}


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "paper"])
def test_json_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.save(tmp_path / "config.json")
    assert PARConfig.load(tmp_path / "config.json") == cfg


def test_paper_preset_matches_table_1():
    with torch.device("meta"):
        model = PARModel(preset("paper"), load_frozen=False)
    groups = model.parameter_groups()
    for name, paper_m in PAPER_TABLE_1.items():
        ours = groups[name] / 1e6
        assert abs(ours - paper_m) / paper_m < 0.10, f"{name}: {ours:.2f}M vs paper {paper_m}M"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": 30, "heads": 4}, "heads"),
        ({"depth": 0}, "depth"),
        ({"variant": "nope"}, "variant"),
        ({"patch_size": 5}, "patch_size"),
        ({"instructions": ()}, "instructions"),
        ({"sample_steps": 1000}, "sample_steps"),
        ({"target_pool": 3}, "target_pool"),
        ({"frame_embed": "conv", "patch_size": 12, "image_size": 24, "target_pool": 1}, "power-of-two"),
    ],
)
def test_invalid_values_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **change)


def test_newer_format_and_wrong_type_refused(tmp_path):
    d = preset("tiny").to_dict()
    (tmp_path / "a.json").write_text(json.dumps({**d, "format_version": CONFIG_FORMAT_VERSION + 1}))
    with pytest.raises(ConfigError, match="newer"):
        PARConfig.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({**d, "type": "something-else"}))
    with pytest.raises(ConfigError, match="expected type"):
        PARConfig.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({**d, "bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        PARConfig.load(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ConfigError, match="d.json"):
        PARConfig.load(tmp_path / "d.json")


def test_task_info_is_the_typed_view_of_extra():
    extra = {"task": "PushCube", "control_mode": "pd_ee_delta_pos", "state_keys": [["agent/qpos", 9]], "made_from": "x"}
    cfg = preset("tiny", extra=extra)
    assert cfg.task_info == TaskInfo("PushCube", None, "pd_ee_delta_pos", None, (("agent/qpos", 9),))
    assert TaskInfo.from_extra(cfg.task_info.to_extra()) == cfg.task_info  # round trip (provenance keys dropped)
    assert PARConfig.from_dict(cfg.to_dict()).task_info == cfg.task_info
    assert preset("tiny").task_info == TaskInfo()  # nothing recorded
    for bad, field in (
        ({"task": 3}, "extra.task"),
        ({"max_episode_steps": "100"}, "max_episode_steps"),
        ({"state_keys": [["qpos"]]}, "state_keys"),
    ):
        with pytest.raises(ConfigError, match=field):
            preset("tiny", extra=bad)
