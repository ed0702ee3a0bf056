"""``par-deploy eval``: statistics, the results file (resume, refusal), episodes against a fake environment with a
tiny untrained TorchPolicy (CacheFullError, crashed/hung workers), an engine against its reference, and (marked
``sim``) a real ManiSkill evaluation through the CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from par_deploy.checkpoint import save_pretrained
from par_deploy.config import preset
from par_deploy.eval import (
    EVAL_SEED_BASE,
    CheckpointSource,
    EngineSource,
    EpisodeJob,
    EpisodeRecord,
    EpisodeRunner,
    EvalError,
    EvalMismatch,
    RolloutSetup,
    compare_runs,
    completed,
    episode_jobs,
    evaluate,
    load_resume,
    newcombe_interval,
    parse_seeds,
    reference_for,
    summarize,
    wilson_interval,
)
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy
from par_deploy.sim.env import TASKS
from tests.faults import fail_as, record_run

INSTRUCTION = TASKS["PushCube"].instruction


# ----------------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # scipy.stats.binomtest(k, n).proportion_ci(method="wilson"); 81/263 is Newcombe's (1998) example
        (0, 10, 0.0, 0.27753279986288926),
        (8, 10, 0.4901624715366418, 0.9433178485456248),
        (10, 10, 0.7224672001371109, 1.0),
        (91, 125, 0.644064961834957, 0.7983392186340461),
        (1, 2, 0.09453120573423074, 0.9054687942657693),
        (81, 263, 0.2552885198782742, 0.36620957698280004),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-9)


def test_wilson_edge_cases_and_newcombe():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    # Newcombe (1998), example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def test_parse_seeds_and_protocol_order():
    assert parse_seeds(None) == (0, 1, 2, 3, 4)
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0-2,7") == (0, 1, 2, 7)
    assert parse_seeds([3, 1]) == (3, 1)
    for bad in ("", "1,1", "a", "-1"):
        with pytest.raises(EvalError):
            parse_seeds(bad)
    jobs = episode_jobs(125, parse_seeds("0-4"))
    assert len(jobs) == 125 and len({j.key for j in jobs}) == 125
    assert {j.state for j in jobs} == set(range(25)) and {j.policy_seed for j in jobs} == set(range(5))
    assert [j.key for j in jobs[:7]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    assert [j.key for j in episode_jobs(7, (0, 1, 2, 3, 4))] == [j.key for j in jobs[:7]]  # a prefix


def _rec(state, seed, once, end, length=10, step=None, act=(1.0, 2.0), error=None, **kw):
    return EpisodeRecord(
        state * 5 + seed,
        state,
        EVAL_SEED_BASE + state,
        seed,
        success_once=once,
        success_at_end=end,
        success_step=step,
        length=length,
        act_ms=list(act),
        error=error,
        seconds=1.0,
        **kw,
    )


def test_summary_maths():
    recs = [
        _rec(0, 0, True, True, length=100, step=40, act=(1, 2, 3, 4)),
        _rec(0, 1, True, False, length=100, step=60, act=(5, 6)),
        _rec(1, 0, False, False, length=32, act=(7,), error="CacheFullError: full"),
        _rec(1, 1, False, False, length=0, act=(), error="worker failed 3 times: x", crashed=True, attempts=3),
    ]
    s = summarize(recs)
    assert s["episodes"] == 4
    assert s["success_once"]["successes"] == 2 and s["success_once"]["rate"] == 0.5
    assert s["success_once"]["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert s["success_at_end"]["successes"] == 1 and s["success_at_end"]["rate"] == 0.25
    assert s["length"] == {"mean": pytest.approx(232 / 3), "min": 32.0, "max": 100.0}  # crashed: not stepped
    assert s["success_step"] == {"mean": 50.0, "min": 40.0, "max": 60.0}
    assert s["act_ms"]["calls"] == 7 and s["act_ms"]["p50"] == 4.0
    assert s["act_ms"]["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 5, 6, 7], 90))
    assert s["errors"] == {"CacheFullError": 1, "crashed": 1} and s["crashed"] == 1 and s["retried"] == 1
    # stop_on_success runs do not measure success_at_end
    assert summarize([_rec(0, 0, True, None)])["success_at_end"] is None


def test_compare_runs_pairs_by_state_and_seed():
    a = [
        _rec(0, 0, True, True, first_chunk=[[0.0, 1.0]], first_obs_sha1="x"),
        _rec(0, 1, True, True, first_chunk=[[0.5, 0.5]], first_obs_sha1="y"),
        _rec(1, 0, False, False, first_chunk=[[0.0, 0.0]], first_obs_sha1="z"),
    ]
    b = [
        _rec(0, 1, False, False, first_chunk=[[0.5, 0.25]], first_obs_sha1="y"),
        _rec(0, 0, True, True, first_chunk=[[0.0, 1.5]], first_obs_sha1="x"),
    ]
    c = compare_runs(a, b)
    assert c["paired_episodes"] == 2
    assert c["success_once"]["difference"] == 0.5 and c["success_once"]["only_a"] == 1
    assert c["success_once"]["only_b"] == 0
    assert c["first_chunk_max_abs_diff"] == 0.5 and c["first_chunk_compared"] == 2
    assert c["first_obs_identical"] == 2


def test_clustered_intervals_account_for_all_or_nothing_states():
    # 25 states x 5 seeds, every state all-or-nothing: 19 solved states -> 95 of 125 rollouts
    recs = [_rec(i, j, i < 19, i < 19) for i in range(25) for j in range(5)]
    s = summarize(recs)["success_once"]
    assert (s["successes"], s["n"], s["states"]) == (95, 125, 25)
    assert s["ci95"] == pytest.approx(list(wilson_interval(95, 125)))
    assert s["ci95_states"] == pytest.approx(list(wilson_interval(19, 25)))  # 25 independent units, not 125
    lo, hi = s["ci95_bootstrap"]
    assert lo <= 0.76 <= hi and hi - lo > 1.5 * (s["ci95"][1] - s["ci95"][0])  # much wider than over rollouts
    assert summarize(recs)["success_once"]["ci95_bootstrap"] == [lo, hi]  # fixed seed: deterministic
    # independent seeds (one per state): the interval over states is the one over rollouts
    one = summarize([_rec(i, 0, i % 4 != 0, None) for i in range(125)])["success_once"]
    assert one["ci95_states"] == pytest.approx(one["ci95"]) and one["states"] == 125
    # one state: no interval over states by resampling
    assert summarize([_rec(0, j, j < 3, None) for j in range(5)])["success_once"]["ci95_bootstrap"] is None
    from par_deploy.eval import cluster_bootstrap_interval

    # resampling clusters of mixed sizes: the pooled rate of a state that always succeeds and one that never does
    assert cluster_bootstrap_interval([5, 0], [5, 5]) == (0.0, 1.0)


def test_states_seeds_and_episodes_compose():
    from par_deploy.eval import episode_count

    assert episode_count(None, None, (0, 1, 2, 3, 4)) == 125  # the paper's 25 x 5
    assert episode_count(125, None, (0,)) == 125  # 125 distinct states, one policy seed
    assert episode_count(10, None, (0, 1)) == 20
    assert episode_count(None, 7, (0, 1, 2, 3, 4)) == 7  # a prefix
    assert episode_count(25, 50, (0, 1, 2, 3, 4)) == 50
    with pytest.raises(EvalError, match="raise --states to 11"):
        episode_count(10, 51, (0, 1, 2, 3, 4))
    with pytest.raises(EvalError, match="--states must be >= 1"):
        episode_count(0, None, (0,))
    jobs = episode_jobs(episode_count(125, None, (0,)), (0,))
    assert [j.key for j in jobs[:3]] == [(0, 0), (1, 0), (2, 0)] and jobs[-1].state == 124


# ----------------------------------------------------------------------------------------------------------
# Results file


PROTOCOL = {"task": "PushCube", "max_steps": 100, "policy_seeds": [0, 1, 2, 3, 4], "state_seed_base": EVAL_SEED_BASE}
POLICY = {"kind": "checkpoint", "checkpoint_hash": "abc", "sampler": "ddim", "steps": 10}


def test_resume_file_logic(tmp_path):
    path = tmp_path / "r.json"
    doc = load_resume(path, PROTOCOL, {"reference": POLICY})  # no file yet: a new document
    assert doc["runs"] == {} and doc["protocol"] == PROTOCOL
    doc["runs"]["reference"] = {
        "policy": POLICY,
        "episodes": [
            _rec(0, 0, True, True).to_dict(),
            _rec(0, 1, False, False, error="worker failed 3 times: x", crashed=True).to_dict(),
        ],
    }
    path.write_text(json.dumps(doc))
    again = load_resume(path, PROTOCOL, {"reference": POLICY, "engine": {**POLICY, "kind": "engine"}})
    assert list(completed(again, "reference")) == [(0, 0)]  # crashed episodes are re-run
    assert completed(again, "engine") == {}

    with pytest.raises(EvalMismatch, match="max_steps: 100 in the file vs 50 now"):
        load_resume(path, {**PROTOCOL, "max_steps": 50}, {"reference": POLICY})
    with pytest.raises(EvalMismatch, match="checkpoint_hash"):
        load_resume(path, PROTOCOL, {"reference": {**POLICY, "checkpoint_hash": "def"}})
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EvalMismatch, match="not a par-deploy evaluation file"):
        load_resume(path, PROTOCOL, {"reference": POLICY})
    path.write_text("{truncated")
    with pytest.raises(EvalMismatch, match="not a readable results file"):
        load_resume(path, PROTOCOL, {"reference": POLICY})


# ----------------------------------------------------------------------------------------------------------
# A fake environment (the ParEnv interface) and a tiny untrained checkpoint


class FakeEnv:
    """ParEnv interface with 1 camera, state 16, action 4; ``info["success"]`` from step ``success_from`` on
    (``success_until`` ends it). ``faults`` maps an env seed to ``exit``, ``kill`` (SIGKILL), ``raise``,
    ``hang``, ``interrupt``; with ``marker_dir`` a fault fires only on its first occurrence (a marker file
    remembers it across processes)."""

    def __init__(
        self,
        task,
        *,
        control_mode,
        image_size,
        max_episode_steps,
        success_from=None,
        success_until=None,
        faults=None,
        marker_dir=None,
    ):
        self.spec = TASKS[task]
        self.control_mode, self.image_size, self.max_episode_steps = control_mode, image_size, max_episode_steps
        self.num_cameras, self.state_dim, self.action_dim = 1, 16, 4
        self.success_from, self.success_until = success_from, success_until
        self.faults, self.marker_dir = faults or {}, marker_dir
        self.t, self.seed, self.closed = 0, None, False

    def _obs(self):
        g = np.random.default_rng([self.seed, self.t])
        return {
            "rgb": g.integers(0, 256, (1, self.image_size, self.image_size, 3), dtype=np.uint8),
            "state": g.standard_normal(16).astype(np.float32),
        }

    def _fault(self, seed):
        kind = self.faults.get(seed - EVAL_SEED_BASE)
        if kind is None:
            return
        if self.marker_dir is not None and record_run(self.marker_dir, seed) > 0:
            return
        fail_as(kind, f"simulated simulator failure at seed {seed}")

    def reset(self, seed):
        self._fault(seed)
        self.t, self.seed = 0, seed
        return self._obs()

    def step(self, action):
        assert action.shape == (4,) and action.dtype == np.float32
        self.t += 1
        ok = self.success_from is not None and self.t >= self.success_from
        ok = ok and (self.success_until is None or self.t < self.success_until)
        return self._obs(), 0.0, False, self.t >= self.max_episode_steps, {"success": ok}

    def close(self):
        self.closed = True


def _checkpoint(path, seed=0, **overrides):
    kw = {"state_dim": 16, "action_dim": 4, "instructions": (INSTRUCTION,), "beta_schedule": "linear", **overrides}
    cfg = preset("tiny", **kw)
    torch.manual_seed(seed)
    model = PARModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_pretrained(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")  # max_blocks 8 x chunk 4 = 32 env steps


def _evaluate(ckpt, tmp_path, *, env=None, **kw):
    kw.setdefault("episodes", 2)
    kw.setdefault("max_steps", 12)
    kw.setdefault("workers", 0)
    env = env or functools.partial(FakeEnv, success_from=5)
    return evaluate("PushCube", CheckpointSource(ckpt), env_factory=env, progress=False, **kw)


def test_episodes_run_and_record_both_success_metrics(ckpt, tmp_path):
    res = _evaluate(ckpt, tmp_path, episodes=3, seeds=(0, 1), json_path=tmp_path / "r.json")
    recs = res.main.episodes
    assert [(r.state, r.policy_seed, r.env_seed) for r in recs] == [
        (0, 0, EVAL_SEED_BASE),
        (0, 1, EVAL_SEED_BASE),
        (1, 0, EVAL_SEED_BASE + 1),
    ]
    for r in recs:
        assert r.success_once and r.success_at_end and r.success_step == 5
        assert r.length == 12 and r.control_steps == 3 and len(r.act_ms) == 3  # chunks of 4
        assert r.error is None and r.attempts == 1 and np.asarray(r.first_chunk).shape == (4, 4)
    # same state, same first observation; different noise seeds, different first chunks
    assert recs[0].first_obs_sha1 == recs[1].first_obs_sha1 != recs[2].first_obs_sha1
    assert not np.allclose(recs[0].first_chunk, recs[1].first_chunk)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["format"] == "par-eval" and doc["protocol"]["max_steps"] == 12
    assert doc["protocol"]["policy_seeds"] == [0, 1] and doc["protocol"]["control_mode"] == "pd_ee_delta_pos"
    run = doc["runs"]["reference"]
    assert run["summary"]["success_once"]["rate"] == 1.0 and len(run["episodes"]) == 3
    assert run["policy"]["kind"] == "checkpoint" and run["policy"]["steps"] == 4
    assert doc["machine"]["cpu_count"] == os.cpu_count() and "numpy" in doc["machine"]["packages"]

    # success that does not last: success_once, not success_at_end; stop_on_success ends the episode there
    flicker = functools.partial(FakeEnv, success_from=3, success_until=6)
    r = _evaluate(ckpt, tmp_path, episodes=1, env=flicker).main.episodes[0]
    assert (r.success_once, r.success_at_end, r.success_step, r.length) == (True, False, 3, 12)
    r = _evaluate(ckpt, tmp_path, episodes=1, env=flicker, stop_on_success=True).main.episodes[0]
    assert (r.success_once, r.success_at_end, r.length) == (True, None, 3)


def test_same_seeds_same_rollout(ckpt, tmp_path):
    """The protocol is deterministic: same state and policy seed -> the same actions, in any run."""
    a = _evaluate(ckpt, tmp_path, episodes=2).main.episodes
    b = _evaluate(ckpt, tmp_path, episodes=2).main.episodes
    assert [r.first_chunk for r in a] == [r.first_chunk for r in b]


def test_cache_full_ends_the_episode_as_a_recorded_failure(ckpt, tmp_path):
    # the tiny policy's cache holds 8 chunks of 4 actions = 32 env steps; the limit is 40
    res = _evaluate(ckpt, tmp_path, episodes=2, max_steps=40, env=functools.partial(FakeEnv, success_from=10))
    for r in res.main.episodes:
        assert r.error.startswith("CacheFullError") and r.length == 32 and r.control_steps == 8
        assert r.success_once and r.success_at_end is False and r.success_step == 10
    s = res.main.summary
    assert s["errors"] == {"CacheFullError": 2} and s["success_at_end"]["rate"] == 0.0 and s["crashed"] == 0


def test_interrupted_evaluation_resumes_and_refuses_other_settings(ckpt, tmp_path):
    path = tmp_path / "r.json"
    broken = functools.partial(FakeEnv, success_from=5, faults={2: "interrupt"})
    with pytest.raises(KeyboardInterrupt):
        _evaluate(ckpt, tmp_path, episodes=4, seeds=(0,), json_path=path, env=broken)
    done = json.loads(path.read_text())["runs"]["reference"]["episodes"]
    assert [r["state"] for r in done] == [0, 1]  # written after every episode

    res = _evaluate(ckpt, tmp_path, episodes=4, seeds=(0,), json_path=path)
    assert res.skipped == {"reference": 2}
    assert [r.state for r in res.main.episodes] == [0, 1, 2, 3]
    assert [r.to_dict() for r in res.main.episodes[:2]] == done  # kept as they were, not re-run
    assert res.main.summary["episodes"] == 4

    with pytest.raises(EvalMismatch, match="max_steps"):
        _evaluate(ckpt, tmp_path, episodes=4, seeds=(0,), json_path=path, max_steps=8)
    with pytest.raises(EvalMismatch, match="policy_seeds"):
        _evaluate(ckpt, tmp_path, episodes=4, seeds=(1,), json_path=path)
    other = _checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(EvalMismatch, match="checkpoint_hash"):
        evaluate(
            "PushCube",
            CheckpointSource(other),
            episodes=1,
            seeds=(0,),
            max_steps=12,
            workers=0,
            json_path=path,
            env_factory=FakeEnv,
            progress=False,
        )
    with pytest.raises(EvalMismatch, match="steps"):  # same checkpoint, another sampler setting
        evaluate(
            "PushCube",
            CheckpointSource(ckpt, steps=2),
            episodes=1,
            seeds=(0,),
            max_steps=12,
            workers=0,
            json_path=path,
            env_factory=FakeEnv,
            progress=False,
        )


def test_refuses_a_policy_for_another_task_or_embodiment(ckpt, tmp_path):
    with pytest.raises(EvalError, match="instruction"):
        evaluate("StackCube", CheckpointSource(ckpt), episodes=1, workers=0, env_factory=FakeEnv, progress=False)
    wrong = _checkpoint(tmp_path / "wrong", state_dim=3)
    with pytest.raises(EvalError, match="state_dim: policy 3 vs environment 16"):
        evaluate(
            "PushCube", CheckpointSource(wrong), episodes=1, max_steps=4, workers=0, env_factory=FakeEnv, progress=False
        )


class _PredictingPolicy(TorchPolicy):
    """Exposes the optional ``predict_frame()`` (here a constant grey frame)."""

    def predict_frame(self):
        s = self.spec
        return np.full((s.num_cameras, s.image_size, s.image_size, 3), 128, np.uint8)


class _NoFramePolicy(TorchPolicy):
    predict_frame = None


def test_video_of_real_and_predicted_frames(ckpt, tmp_path):
    import imageio.v2 as imageio

    setup = RolloutSetup(
        task="PushCube",
        policy=CheckpointSource(ckpt),
        instruction=INSTRUCTION,
        control_mode="pd_ee_delta_pos",
        image_size=16,
        max_steps=8,
        video_dir=str(tmp_path / "v"),
        label="reference",
    )
    env = FakeEnv("PushCube", control_mode="pd_ee_delta_pos", image_size=16, max_episode_steps=8)
    runner = EpisodeRunner(setup, policy=_PredictingPolicy.from_pretrained(ckpt), env=env)
    rec = runner.run(EpisodeJob(0, 3, 1))
    assert rec.video.endswith("PushCube_reference_state003_seed1.mp4")
    real = imageio.mimread(rec.video)
    both = imageio.mimread(rec.video_predicted)
    assert len(real) == len(both) == 9  # first observation + 8 steps
    assert real[0].shape[:2] == (16, 16) and both[0].shape[:2] == (16, 32)  # real | predicted side by side
    assert abs(float(both[4][:, 16:].mean()) - 128) < 8
    # the reference predicts frames itself (TorchPolicy.predict_frame): both videos
    runner = EpisodeRunner(setup, policy=TorchPolicy.from_pretrained(ckpt), env=env)
    rec = runner.run(EpisodeJob(1, 4, 0))
    assert imageio.mimread(rec.video_predicted)[0].shape[:2] == (16, 32)
    # a policy without predict_frame (engines export no frame head): only the real video is written
    runner = EpisodeRunner(setup, policy=_NoFramePolicy.from_pretrained(ckpt), env=env)
    assert runner.run(EpisodeJob(2, 5, 0)).video_predicted is None


# ----------------------------------------------------------------------------------------------------------
# Worker pool: crashes, exceptions and hangs are retried and reported


def test_crashed_and_hung_workers_are_restarted_and_reported(ckpt, tmp_path):
    # state 1: the process exits once; state 2: the env raises on every attempt; state 3: hangs once;
    # state 4: the process is killed (SIGKILL) once
    faults = {1: "exit", 3: "hang", 4: "kill"}
    env = functools.partial(_FaultyEnv, success_from=5, faults=faults, always={2: "raise"}, marker_dir=str(tmp_path))
    path = tmp_path / "r.json"
    t0 = time.perf_counter()
    res = _evaluate(
        ckpt, tmp_path, episodes=5, seeds=(0,), workers=1, timeout=5, max_retries=1, json_path=path, env=env
    )
    elapsed = time.perf_counter() - t0
    recs = {r.state: r for r in res.main.episodes}
    assert sorted(recs) == [0, 1, 2, 3, 4]  # nothing dropped
    assert recs[0].attempts == 1 and recs[0].success_once
    assert recs[1].attempts == 2 and "died (exit code 3)" in recs[1].retry_reasons[0] and recs[1].success_once
    assert recs[2].crashed and not recs[2].success_once and recs[2].attempts == 2
    assert all("RuntimeError: simulated simulator failure" in x for x in recs[2].retry_reasons)
    assert recs[3].attempts == 2 and "timed out" in recs[3].retry_reasons[0] and recs[3].success_once
    assert recs[4].attempts == 2 and "died (exit code -9)" in recs[4].retry_reasons[0] and recs[4].success_once
    s = res.main.summary
    assert s["crashed"] == 1 and s["retried"] == 4 and s["success_once"]["successes"] == 4
    assert len({recs[k].pid for k in (0, 1, 3, 4)}) == 4  # restarted workers
    saved = json.loads(path.read_text())["runs"]["reference"]["episodes"]
    assert [r["attempts"] for r in saved] == [1, 2, 2, 2, 2]
    assert elapsed < 120

    # resuming re-runs only the crashed episode (still failing here: recorded again, never dropped)
    res = _evaluate(
        ckpt, tmp_path, episodes=5, seeds=(0,), workers=1, timeout=5, max_retries=0, json_path=path, env=env
    )
    assert res.skipped == {"reference": 4} and res.main.summary["crashed"] == 1


class _HistoryEnv(FakeEnv):
    """A simulator with memory, as ManiSkill's CPU physics has: observations depend on what earlier episodes of
    this instance did (and on the global numpy RNG, which some simulators draw from)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.history = 0.0

    def _obs(self):
        obs = super()._obs()
        obs["state"] = (obs["state"] + self.history + np.random.random()).astype(np.float32)
        return obs

    def step(self, action):
        out = super().step(action)
        self.history += float(np.abs(action).sum())
        return out


def test_resumed_evaluation_equals_uninterrupted_episode_by_episode(ckpt, tmp_path):
    env = functools.partial(_HistoryEnv, success_from=5)
    whole = _evaluate(ckpt, tmp_path, episodes=3, seeds=(0, 1), json_path=tmp_path / "a.json", env=env)
    _evaluate(ckpt, tmp_path, episodes=1, seeds=(0, 1), json_path=tmp_path / "b.json", env=env)
    resumed = _evaluate(ckpt, tmp_path, episodes=3, seeds=(0, 1), json_path=tmp_path / "b.json", env=env)
    assert resumed.skipped == {"reference": 1}
    for a, b in zip(whole.main.episodes, resumed.main.episodes, strict=True):
        assert a.trajectory_sha1 == b.trajectory_sha1 and a.first_chunk == b.first_chunk
    # the environment does carry state: sharing one instance across episodes (no isolation) changes the result
    setup = RolloutSetup(
        task="PushCube",
        policy=CheckpointSource(ckpt),
        instruction=INSTRUCTION,
        control_mode="pd_ee_delta_pos",
        image_size=16,
        max_steps=12,
    )
    shared = EpisodeRunner(
        setup, env=env("PushCube", control_mode="pd_ee_delta_pos", image_size=16, max_episode_steps=12)
    )
    shared.run(EpisodeJob(0, 0, 0))
    assert shared.run(EpisodeJob(1, 0, 1)).trajectory_sha1 != whole.main.episodes[1].trajectory_sha1


class _BrokenEnv(FakeEnv):
    def __init__(self, *args, error="par", **kw):
        if error == "par":
            from par_deploy.sim.env import SimulatorUnavailable

            raise SimulatorUnavailable("SAPIEN cannot create a Vulkan 'cpu' render device (x). Fix: bash setup.sh")
        raise RuntimeError("unexpected\nmulti-line failure")


@pytest.mark.parametrize("error", ["par", "other"])
def test_a_worker_that_cannot_start_is_one_line_naming_the_cause(ckpt, tmp_path, error):
    with pytest.raises(EvalError) as info:
        _evaluate(ckpt, tmp_path, episodes=1, workers=1, env=functools.partial(_BrokenEnv, error=error))
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert "reference worker could not load" in msg and str(ckpt) in msg
    if error == "par":
        assert "SimulatorUnavailable" in msg and "Fix: bash setup.sh" in msg
    else:
        assert "RuntimeError: unexpected multi-line failure" in msg and "--workers 0" in msg


def test_results_file_holds_no_machine_path(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths are stored relative to the working directory (the repo, when committed)
    monkeypatch.setenv("VK_ICD_FILENAMES", "/opt/mesa/share/vulkan/icd.d/lvp_icd.x86_64.json")
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/par-deploy", "eval", "--json", str(tmp_path / "r.json")])
    from par_deploy.eval.run import _command

    _evaluate(
        ckpt,
        tmp_path,
        episodes=1,
        json_path=tmp_path / "r.json",
        video_dir=tmp_path / "v",
        command=_command({"json_path": tmp_path / "r.json", "console": object, "episodes": 1}),
    )
    doc = json.loads((tmp_path / "r.json").read_text())

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    found = list(strings(doc))
    assert not [v for v in found if os.path.isabs(v) or str(tmp_path) in v]
    assert doc["command"]["argv"] == ["par-deploy", "eval", "--json", "r.json"]
    assert doc["arguments"]["json_path"] == "r.json" and doc["command"]["json_path"] == "r.json"
    assert doc["command"]["episodes"] == 1 and "console" not in doc["command"]  # only the plain arguments
    assert doc["machine"]["env"]["VK_ICD_FILENAMES"] == "lvp_icd.x86_64.json"
    assert doc["runs"]["reference"]["episodes"][0]["video"] == "v/PushCube_reference_state000_seed0.mp4"


class _FaultyEnv(FakeEnv):
    """``faults`` fire once (marker files); ``always`` fire on every attempt."""

    def __init__(self, *args, always=None, **kw):
        super().__init__(*args, **kw)
        self.always = always or {}

    def reset(self, seed):
        if self.always.get(seed - EVAL_SEED_BASE) == "raise":
            raise RuntimeError(f"simulated simulator failure at seed {seed}")
        return super().reset(seed)


# ----------------------------------------------------------------------------------------------------------
# Engine against its reference (needs par_deploy.export.load_policy)


def test_engine_compare_with_reference(ckpt, tmp_path):
    try:
        from par_deploy.export import export_bundle, load_policy  # noqa: F401
    except ImportError as e:
        pytest.skip(f"par_deploy.export.load_policy is not available yet ({e})")
    bundle = tmp_path / "bundle"
    export_bundle(ckpt, bundle, backends=("onnx",), denoise_steps=4, progress=False)
    engine = EngineSource(bundle, backend="onnx")
    ref = reference_for(engine)  # the manifest's source checkpoint, with the bundle's sampler and K
    assert Path(ref.path).resolve() == Path(ckpt).resolve() and ref.steps == 4
    res = evaluate(
        "PushCube",
        engine,
        reference=ref,
        episodes=2,
        max_steps=12,
        workers=0,
        env_factory=FakeEnv,
        json_path=tmp_path / "r.json",
        progress=False,
    )
    assert list(res.runs) == ["engine", "reference"]
    c = res.compare
    assert c["paired_episodes"] == 2 and c["first_chunk_compared"] == 2 and c["first_obs_identical"] == 2
    assert c["first_chunk_max_abs_diff"] < 1e-4
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["compare"]["first_chunk_max_abs_diff"] == c["first_chunk_max_abs_diff"]
    assert doc["runs"]["engine"]["policy"]["kind"] == "engine"
    other = _checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(EvalError, match="not from .*other.*meaningless"):
        reference_for(engine, other)


@pytest.mark.parametrize("workers,cache", [(0, "static"), (1, "static"), (0, "slide")])
def test_batched_engine_eval_equals_batch_1_episodes(ckpt, tmp_path, workers, cache):
    """A bundle exported with --batch 3 steps 5 episodes as groups of 3 and 2 (a row sits out the second group):
    each episode's record equals the batch-1 engine's (same seeds, same noise); a static cache that ends before
    the limit ends every row of the group with the batch-1 error, a sliding one slides and goes on."""
    from par_deploy.export import export_bundle

    if cache == "slide":  # 3 blocks of 4 env steps: 10 control steps slide 4 times
        ckpt = _checkpoint(tmp_path / "slide", max_blocks=3, overflow="slide")
    single = export_bundle(ckpt, tmp_path / "b1", backends=("onnx",), denoise_steps=4, progress=False).bundle_dir
    batched = export_bundle(ckpt, tmp_path / "b3", backends=("onnx",), denoise_steps=4, progress=False, batch=3)
    engine = EngineSource(str(batched.bundle_dir))
    assert engine.batch == 3 and engine.identity()["batch"] == 3 and "batch" not in EngineSource(single).identity()
    env = functools.partial(FakeEnv, success_from=6)
    kw = {"episodes": 5, "seeds": (0, 1), "max_steps": 40, "env_factory": env, "progress": False}  # cache: 32 steps
    one = evaluate("PushCube", EngineSource(str(single)), workers=0, json_path=tmp_path / "one.json", **kw).main
    three = evaluate("PushCube", engine, workers=workers, json_path=tmp_path / "three.json", **kw).main
    a, b = one.episodes, three.episodes
    assert [(r.state, r.policy_seed) for r in a] == [(r.state, r.policy_seed) for r in b]
    for x, y in zip(a, b, strict=True):
        assert (x.success_once, x.success_step, x.length, x.control_steps) == (
            y.success_once,
            y.success_step,
            y.length,
            y.control_steps,
        )
        assert x.first_obs_sha1 == y.first_obs_sha1
        np.testing.assert_allclose(x.first_chunk, y.first_chunk, atol=1e-4)
        assert (x.error is None) == (y.error is None) and (x.error or "").split(":")[0] == (y.error or "").split(":")[0]
    if cache == "static":
        assert {r.length for r in b} == {32} and all("CacheFullError" in r.error for r in b)
    else:
        assert {r.length for r in b} == {40} and all(r.error is None for r in b)
    assert len({r.pid for r in b}) == 1
    with pytest.raises(EvalError, match="--video needs a batch-1 engine"):
        evaluate("PushCube", engine, workers=0, video_dir=tmp_path / "v", **kw)


# ----------------------------------------------------------------------------------------------------------
# No policy given: task -> shipped checkpoint -> bundle


def _roots(mp, root):
    from par_deploy import locate

    mp.setattr(locate, "CHECKPOINTS_ROOT", root / "checkpoints")
    mp.setattr(locate, "BUNDLES_ROOT", root / "bundles")


@pytest.fixture(scope="module")
def shipped_tree(tmp_path_factory):
    """A tiny PushCube checkpoint shipped (nothing else), exported once by the resolution under test."""
    from par_deploy.locate import task_bundle

    root = tmp_path_factory.mktemp("shipped")
    _checkpoint(root / "checkpoints" / "pushcube-cpu-small", extra={"task": "PushCube"})
    with pytest.MonkeyPatch.context() as mp:
        _roots(mp, root)
        resolved = task_bundle("PushCube")
    assert resolved.exported and resolved.bundle == root / "bundles" / "pushcube"
    return root


@pytest.fixture
def shipped(shipped_tree, tmp_path, monkeypatch):
    """A copy of the shipped tree as the checkpoint and bundle roots; the working directory."""
    import shutil

    shutil.copytree(shipped_tree, tmp_path, dirs_exist_ok=True)
    _roots(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_task_resolves_to_its_shipped_checkpoint_and_bundle(shipped):
    from par_deploy.eval.run import _sources
    from par_deploy.locate import task_bundle

    first = task_bundle("PushCube")
    assert not first.exported  # up to date (exported by the fixture): kept
    assert first.bundle == shipped / "bundles" / "pushcube"
    assert first.checkpoint == shipped / "checkpoints" / "pushcube-cpu-small"
    assert first.describe() == "checkpoint checkpoints/pushcube-cpu-small, bundle bundles/pushcube (up to date)"
    _checkpoint(shipped / "checkpoints" / "pushcube-cpu-small", seed=3, extra={"task": "PushCube"})  # retrained
    again = task_bundle("PushCube")
    assert again.exported and "(exported now)" in again.describe()
    assert not task_bundle("PushCube").exported
    # what `par-deploy eval --task PushCube` evaluates, and its reference with --compare
    policy, reference, note = _sources("PushCube", None, None, True, "onnx", None, None, 1, None)
    assert isinstance(policy, EngineSource) and Path(policy.path) == first.bundle
    assert Path(reference.path) == first.checkpoint and reference.steps == 4
    assert note == "PushCube: checkpoint checkpoints/pushcube-cpu-small, bundle bundles/pushcube (up to date)"


def test_unknown_or_untrained_task_is_a_clear_error(shipped):
    from par_deploy.locate import NotFound, task_bundle

    with pytest.raises(NotFound, match="unknown task 'Foo'; known tasks: PushCube, PickCube, StackCube"):
        task_bundle("Foo")
    with pytest.raises(NotFound) as info:
        task_bundle("StackCube")
    msg = str(info.value)
    assert "no shipped checkpoint for StackCube (checkpoints/stackcube-cpu-small); tasks with one: PushCube" in msg
    assert "par-deploy demos --task StackCube" in msg and "par-deploy train data/StackCube" in msg
    assert not (shipped / "bundles" / "stackcube").exists()  # nothing exported on the way


def test_bundle_finds_its_source_checkpoint_relative_to_itself(shipped):
    from par_deploy.locate import NotFound, source_checkpoint, task_bundle

    bundle = task_bundle("PushCube").bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    want = shipped / "checkpoints" / "pushcube-cpu-small"
    for written in (
        "checkpoints/pushcube-cpu-small",  # relative to the working directory at export
        "../checkpoints/pushcube-cpu-small",  # relative to the bundle directory
        str(want),
    ):
        assert source_checkpoint(bundle, {**manifest, "source_checkpoint": written}).resolve() == want
    with pytest.raises(NotFound, match="pass the checkpoint"):
        source_checkpoint(bundle, {**manifest, "source_checkpoint": "gone"})


def test_demo_runs_the_shared_episode_loop(shipped, monkeypatch):
    from rich.console import Console

    from par_deploy import describe

    monkeypatch.setattr(
        describe,
        "_demo_env",
        lambda task, policy, console: (
            describe.RandomObservationEnv(policy.spec, policy.normalizer),
            "random observations",
        ),
    )
    console = Console(record=True, width=200)
    summary = describe.run_demo("PushCube", steps=3, seed=2, console=console)
    assert summary["control_steps"] == 3 and summary["env_steps"] == 12 and summary["success"] is False
    assert summary["source"] == "random observations, initial state seed 500002"
    text = console.export_text()
    assert "bundle bundles/pushcube (up to date)" in text and "step 2: chunk (4, 4)" in text


def test_bench_without_engine_measures_the_task_bundle(shipped):
    from par_deploy.bench import BenchOptions
    from par_deploy.bench.run import run_bench

    result = run_bench(
        None, options=BenchOptions(reps=2, warmup=1, ks=(), memory=False, progress=False), task="PushCube"
    )
    assert Path(result["bundle"]).resolve() == shipped / "bundles" / "pushcube"
    assert Path(result["reference"]).resolve() == shipped / "checkpoints" / "pushcube-cpu-small"


# ----------------------------------------------------------------------------------------------------------
# The simulator


@pytest.mark.sim
def test_cli_eval_in_maniskill(tmp_path):
    from typer.testing import CliRunner

    from par_deploy.cli import app

    # tiny preset at the task's sizes; the cache covers the task's 100 steps (25 chunks of 4, + 1)
    ckpt = _checkpoint(tmp_path / "ckpt", image_size=64, max_blocks=26)
    out = tmp_path / "r.json"
    args = [
        "eval",
        "--task",
        "PushCube",
        "--checkpoint",
        str(ckpt),
        "--episodes",
        "2",
        "--max-env-steps",
        "16",
        "--workers",
        "1",
        "--json",
        str(out),
        "--video",
        str(tmp_path / "video"),
    ]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    elapsed = time.perf_counter() - t0
    doc = json.loads(out.read_text())
    run = doc["runs"]["reference"]
    assert doc["protocol"]["env_id"] == "PushCube-v1" and doc["protocol"]["image_size"] == 64
    assert [(r["state"], r["policy_seed"], r["env_seed"]) for r in run["episodes"]] == [
        (0, 0, EVAL_SEED_BASE),
        (0, 1, EVAL_SEED_BASE),
    ]
    for r in run["episodes"]:
        assert r["length"] == 16 and r["control_steps"] == 4 and r["error"] is None
        assert isinstance(r["success_once"], bool) and isinstance(r["success_at_end"], bool)
        assert Path(r["video"]).stat().st_size > 0
    assert run["episodes"][0]["first_obs_sha1"] == run["episodes"][1]["first_obs_sha1"]  # reset is deterministic
    assert run["summary"]["episodes"] == 2 and run["summary"]["act_ms"]["calls"] == 8
    assert doc["command"]["episodes"] == 2 and doc["machine"]["packages"]["mani-skill"]
    assert "success_once" in result.output
    print(f"2 PushCube episodes of 16 steps in {elapsed:.1f} s (incl. worker start-up)")

    # a second run resumes: nothing left to do
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["runs"]["reference"]["episodes"] == run["episodes"]


@pytest.mark.sim
def test_resumed_evaluation_in_maniskill_equals_uninterrupted(tmp_path):
    """ManiSkill's CPU physics keeps state across reset: an episode must not depend on the ones before it."""
    ckpt = _checkpoint(tmp_path / "ckpt", image_size=64)
    kw = {"episodes": 3, "seeds": (0,), "max_steps": 10, "workers": 0, "progress": False}
    whole = evaluate("PushCube", CheckpointSource(ckpt), json_path=tmp_path / "a.json", **kw)
    evaluate("PushCube", CheckpointSource(ckpt), json_path=tmp_path / "b.json", **{**kw, "episodes": 1})
    resumed = evaluate("PushCube", CheckpointSource(ckpt), json_path=tmp_path / "b.json", **kw)
    assert resumed.skipped == {"reference": 1}
    a, b = whole.main.episodes, resumed.main.episodes
    assert [r.state for r in a] == [r.state for r in b] == [0, 1, 2]
    assert [r.trajectory_sha1 for r in a] == [r.trajectory_sha1 for r in b]
    assert [r.success_step for r in a] == [r.success_step for r in b] and all(r.length == 10 for r in a)


@pytest.mark.sim
def test_eval_through_the_policy_server_equals_the_in_process_engine(tmp_path):
    """`par-deploy eval --server URL`: the same states and noise through the server give the same episodes."""
    from par_deploy.eval.sources import EngineSource, ServerSource
    from par_deploy.export import export_bundle
    from par_deploy.serve.server import PolicyServer, ServerThread

    ckpt = _checkpoint(tmp_path / "ckpt", image_size=64, max_blocks=6, overflow="slide", extra={"task": "PushCube"})
    bundle = export_bundle(ckpt, tmp_path / "bundle", backends=("onnx",), denoise_steps=4, progress=False).bundle_dir
    kw = {"episodes": 2, "seeds": (0, 1), "max_steps": 32, "workers": 0, "progress": False}
    local = evaluate("PushCube", EngineSource(str(bundle)), json_path=tmp_path / "a.json", **kw)
    with ServerThread(PolicyServer(bundle, "onnx", threads=1, pool_size=1, max_clients=2)) as st:
        served = evaluate("PushCube", ServerSource(st.url), json_path=tmp_path / "b.json", **kw)
    a, b = local.main.episodes, served.main.episodes
    assert [r.control_steps for r in a] == [r.control_steps for r in b] == [8, 8]  # past the 6-block cache
    assert [r.trajectory_sha1 for r in a] == [r.trajectory_sha1 for r in b]
    assert [r.error for r in b] == [None, None]
