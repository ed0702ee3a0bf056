"""``par-deploy eval``: ManiSkill3 success rate of a PAR policy (an engine bundle or the PyTorch reference)
under the paper's protocol (125 rollouts = 25 initial states x 5 policy seeds, §5.1).

Modules by role: ``protocol`` (initial states, seeds, episode order), ``stats`` (rates, intervals, summaries,
comparison), ``sources`` (what is evaluated), ``episode`` (the one episode loop and its record), ``rollouts``
(in-process and process-pool backends), ``results`` (the resumable JSON file), ``report`` (progress and
table), ``run`` (``evaluate`` and the CLI entry ``run_eval``).
"""

from par_deploy.eval.episode import ControlStep, Episode, EpisodeRecord, EpisodeRunner, check_compatible
from par_deploy.eval.protocol import (
    DEFAULT_EPISODES,
    DEFAULT_SEEDS,
    DEFAULT_STATES,
    EVAL_SEED_BASE,
    EpisodeJob,
    EvalError,
    EvalMismatch,
    episode_count,
    episode_jobs,
    parse_seeds,
)
from par_deploy.eval.report import print_report
from par_deploy.eval.results import EvalResult, RunResult, completed, load_resume, machine_info
from par_deploy.eval.rollouts import InlineRollouts, ProcessPoolRollouts, Rollouts, RolloutSetup
from par_deploy.eval.run import evaluate, run_eval
from par_deploy.eval.sources import CheckpointSource, EngineSource, PolicySource, SourceInfo, reference_for
from par_deploy.eval.stats import (
    cluster_bootstrap_interval,
    compare_runs,
    newcombe_interval,
    summarize,
    wilson_interval,
)

__all__ = [
    "DEFAULT_EPISODES",
    "DEFAULT_SEEDS",
    "DEFAULT_STATES",
    "EVAL_SEED_BASE",
    "CheckpointSource",
    "ControlStep",
    "EngineSource",
    "Episode",
    "EpisodeJob",
    "EpisodeRecord",
    "EpisodeRunner",
    "EvalError",
    "EvalMismatch",
    "EvalResult",
    "InlineRollouts",
    "PolicySource",
    "ProcessPoolRollouts",
    "Rollouts",
    "RolloutSetup",
    "RunResult",
    "SourceInfo",
    "check_compatible",
    "cluster_bootstrap_interval",
    "compare_runs",
    "completed",
    "episode_count",
    "episode_jobs",
    "evaluate",
    "load_resume",
    "machine_info",
    "newcombe_interval",
    "parse_seeds",
    "print_report",
    "reference_for",
    "run_eval",
    "summarize",
    "wilson_interval",
]
