"""ManiSkill3 simulation: task specs, environment creation and the observation format (see ``env``)."""

from par_deploy.sim.env import (
    TASKS,
    ParEnv,
    SimulatorUnavailable,
    TaskSpec,
    check_simulator,
    convert_obs,
    make_env,
)

__all__ = [
    "TASKS",
    "ParEnv",
    "SimulatorUnavailable",
    "TaskSpec",
    "check_simulator",
    "convert_obs",
    "make_env",
]
