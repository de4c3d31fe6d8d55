"""fedcycle's errors: the bottom of the package, imported by everything, importing nothing."""


class ConfigError(ValueError):
    """A run-config or node-config value that cannot work; the message names the key."""


class TaskError(ConfigError):
    """A task (a user's or a built-in one) that cannot work as written; the message names the
    task, the method or key, the value and what was expected."""
