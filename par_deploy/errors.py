"""Errors with a message a user can act on. Each names the file or tensor, what was expected, what was found."""


class ParError(Exception):
    """Base class of par-deploy's own errors."""


class ConfigError(ParError, ValueError):
    """A configuration value or file is invalid or from an unsupported format version."""


class CheckpointError(ParError):
    """A checkpoint directory is missing a file, is corrupt, or does not match its config."""


class InputError(ParError, ValueError):
    """An observation, action or episode has the wrong shape, dtype or non-finite values."""


class CacheFullError(ParError):
    """The episode is longer than the static KV-cache (config.max_blocks control steps)."""


class ActionError(ParError):
    """The policy produced a non-finite action; it is never returned to the controller."""


class ResumeError(ParError):
    """A training run directory cannot be resumed: old pickled state, or state files that are corrupt or
    do not match each other."""
