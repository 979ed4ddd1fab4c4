"""Errors that mean "the user asked for something that cannot work", as opposed to bugs."""


class ConfigError(ValueError):
    """A bad setting or input, reported with the offending value and how to fix it.

    Scripts print these as one paragraph without a traceback, so the message itself
    must name the key, the value and the fix.
    """
