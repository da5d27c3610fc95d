"""The one error type the command line turns into exit code 2."""

from __future__ import annotations

from collections.abc import Callable


class InputError(Exception):
    """Bad input from a person or a peer: a config, log, scenario or message.

    Carries every problem found (not only the first), each already phrased as
    "<file>: <key>: <reason>", so an installer can fix them all in one pass.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def collect_problems(*checks: Callable[[], object]) -> list[str]:
    """Run each check; collect what they refuse (InputError) instead of stopping at the first, so an
    installer sees every problem in one pass."""
    problems: list[str] = []
    for run_check in checks:
        try:
            run_check()
        except InputError as err:
            problems += err.problems
    return problems
