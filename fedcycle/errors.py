"""fedcycle's errors: the bottom of the package, imported by everything, importing nothing."""


class ConfigError(ValueError):
    """A run-config or node-config value that cannot work; the message names the key.
    `without_values`: the same message without values from a site's data (a cell, a label, a
    path), what a site whose policy keeps them home sends instead (None: the message has none)."""

    def __init__(self, message: str, *, without_values: str | None = None) -> None:
        super().__init__(message)
        self.without_values = without_values


class TaskError(ConfigError):
    """A task (a user's or a built-in one) that cannot work as written; the message names the
    task, the method or key, the value and what was expected."""


class PolicyRefusal(ConfigError):
    """A site's policy forbids what the run asks of it: the site takes no part, and says which
    rule (never its data)."""
