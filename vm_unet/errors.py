"""Project exception types.

CLIs catch :class:`UserError` and print its message as one line (no traceback), so every problem a user can fix
(bad paths, bad data, bad config, bad checkpoint) should be raised as a ``UserError`` naming the file and the problem.
"""


class UserError(Exception):
    """A problem with the user's input (data, config, paths, checkpoint) that they can fix."""


class DataError(UserError, ValueError):
    """Bad or inconsistent data files (missing masks, size mismatch, wrong label values, NaN...)."""


class ConfigError(UserError, ValueError):
    """Bad configuration value or unknown config name."""


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. the loss became NaN/Inf)."""
