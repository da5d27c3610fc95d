"""The commissioning report: every check made, grouped by step, readable on a terminal and as JSON.

An installer reads the terminal form on site; the JSON form (`--report FILE`) is the
record kept with the installation. Both say, for each failed check, what was seen and
what to check, so the report alone is enough to fix the installation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from firmware_py.quoting import printable


class Step(StrEnum):
    """The steps of a commissioning, in the order they run and are reported."""

    CONFIG = "config"
    CAN = "can"
    INVERTER = "inverter"
    SIGN = "sign_test"
    DISPATCH = "dispatch"

    @property
    def title(self) -> str:
        return STEP_TITLES[self]


STEP_TITLES = {
    Step.CONFIG: "configuration",
    Step.CAN: "CAN bus and BMS",
    Step.INVERTER: "inverter (SunSpec Modbus)",
    Step.SIGN: "sign self-test (test discharge)",
    Step.DISPATCH: "dispatch interfaces",
}


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIPPED = "skipped"  # not run: not asked for, or an earlier step it needs failed


@dataclass(frozen=True)
class Check:
    """One thing checked: what was seen (`detail`) and, when it failed, what to check (`advice`)."""

    step: Step
    name: str
    outcome: Outcome
    detail: str
    advice: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "outcome": self.outcome.value, "detail": self.detail, "advice": self.advice}


def passed(step: Step, name: str, detail: str) -> Check:
    return Check(step, name, Outcome.PASS, detail)


def failed(step: Step, name: str, detail: str, advice: str) -> Check:
    return Check(step, name, Outcome.FAIL, detail, advice)


def skipped(step: Step, name: str, detail: str) -> Check:
    return Check(step, name, Outcome.SKIPPED, detail)


def interrupted(step: Step, before: str = "this step was done") -> Check:
    """A stop signal fails the step under way: never a pass, and never blamed on the hardware."""
    return failed(step, "interrupted", f"stopped by a signal before {before}", "run again")


@dataclass
class Report:
    """What a commissioning found; `checks` in the order they were made."""

    config: str
    at: str  # UTC, ISO 8601: when the commissioning started
    software_version: str
    checks: list[Check] = field(default_factory=list)

    def add(self, checks: Iterable[Check]) -> list[Check]:
        added = list(checks)
        self.checks += added
        return added

    def of(self, step: Step) -> list[Check]:
        return [c for c in self.checks if c.step is step]

    def step_outcome(self, step: Step) -> Outcome:
        """FAIL if any check failed; PASS if one passed; SKIPPED if none ran."""
        outcomes = {c.outcome for c in self.of(step)}
        if Outcome.FAIL in outcomes:
            return Outcome.FAIL
        return Outcome.PASS if Outcome.PASS in outcomes else Outcome.SKIPPED

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.outcome is Outcome.FAIL]

    @property
    def passed(self) -> bool:
        """Every check that ran passed (a skipped sign test, not asked for, fails nothing)."""
        return not self.failures and any(c.outcome is Outcome.PASS for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": "commission",
            "config": self.config,
            "at": self.at,
            "software_version": self.software_version,
            "passed": self.passed,
            "failed_checks": len(self.failures),
            "steps": [{"step": step.value, "title": step.title, "outcome": self.step_outcome(step).value,
                       "checks": [c.as_dict() for c in self.of(step)]} for step in Step],
        }


MARKS = {Outcome.PASS: "PASS", Outcome.FAIL: "FAIL", Outcome.SKIPPED: "skip"}


def step_lines(report: Report, step: Step, checks: Sequence[Check] | None = None) -> list[str]:
    """One step as the terminal shows it: a heading, then a line per check (`checks`: only those, a step's
    later findings, under a heading saying so and the step's outcome with them), advice under a failure."""
    later = "" if checks is None else ", later"
    lines = [f"== {step.title}{later}: {report.step_outcome(step).value.upper()}"]
    for check in report.of(step) if checks is None else checks:
        lines.append(f"  {MARKS[check.outcome]}  {printable(check.name)}: {printable(check.detail)}")
        if check.advice:
            lines.append(f"        check: {printable(check.advice)}")
    return lines


def verdict_line(report: Report) -> str:
    counts = {o: sum(c.outcome is o for c in report.checks) for o in Outcome}
    head = "COMMISSIONING PASSED" if report.passed else "COMMISSIONING FAILED"
    return (f"{head}: {counts[Outcome.PASS]} passed, {counts[Outcome.FAIL]} failed, "
            f"{counts[Outcome.SKIPPED]} skipped")
