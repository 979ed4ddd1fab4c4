"""Errors that mean "the user asked for something that cannot work", as opposed to bugs."""


class ConfigError(ValueError):
    """A bad setting or input, reported with the offending value and how to fix it.

    Scripts print these as one paragraph without a traceback, so the message itself
    must name the key, the value and the fix.
    """


class NonFiniteLossError(ConfigError):
    """Training diverged (a nan or inf loss). Settings such as the learning rate are the usual
    cause, so it is reported like a bad setting: one paragraph, no traceback."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after a checkpoint was saved; the message says how to resume."""
