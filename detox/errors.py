"""Errors a user fixes from the message alone: one line, no traceback (detox.train prints them)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""
