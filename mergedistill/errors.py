"""Exceptions that map to the CLI's exit codes (see DESIGN.md: 2 = bad input, 1 = internal failure)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config, a file, a model. The CLI prints every problem and exits 2.

    Holds a list of problems so that all of them are reported at once, each naming the field or file
    at fault and what to do about it."""

    def __init__(self, problems: str | list[str], header: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.header] if self.header else []
        if len(self.problems) == 1 and not self.header:
            return self.problems[0]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(UserError):
    """Problems in a run config (YAML or command-line overrides)."""

