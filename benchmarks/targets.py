"""Targets: what `pytest benchmarks/` measures against, and the table every run ends with.

Two kinds of target, because only one kind says something about our code on any machine:

* correctness (`speed=False`): parity, label agreement, relative error. The same on every
  machine, so a miss always fails its test.
* speed (`speed=True`): a latency or a ratio of two libraries' speeds. It depends on the
  processor and on whatever else the machine runs, so a miss is reported (MISSED in the table)
  and fails only under `pytest benchmarks/ --targets`, the release check on known hardware.
  A speed target may carry a `gate`: a gross-regression bound set well outside the run-to-run
  spread (docs/design.md lists each gate with its measured spread), enforced on every run.

    book.check(Target("cpu b1: ONNX Runtime vs torch eager", goal=1.5, measured=r, unit="x",
                      speed=True, gate=1.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

__all__ = ["Target", "TargetBook"]


@dataclass(frozen=True)
class Target:
    """One measurement against its goal.

    goal, measured: in `unit` ("x" for ratios, "ms", "pt" for mIoU points, "%" ...).
    higher: True when larger is better (ratios, agreement), False for errors and latencies.
    speed: the measurement depends on the machine's speed (see the module docstring).
    gate: a speed target's gross-regression bound on the same side as `goal`, always enforced.
    """

    name: str
    goal: float
    measured: float
    unit: str = ""
    higher: bool = True
    speed: bool = False
    gate: float | None = None

    def _meets(self, bound: float) -> bool:
        if math.isnan(self.measured):  # NaN never meets a bound
            return False
        return self.measured >= bound if self.higher else self.measured <= bound

    @property
    def met(self) -> bool:
        return self._meets(self.goal)

    @property
    def gate_met(self) -> bool:
        return self.gate is None or self._meets(self.gate)

    @property
    def margin(self) -> float:
        """Signed distance to the goal in `unit`: positive = met with that much room."""
        return (self.measured - self.goal) * (1 if self.higher else -1)

    def status(self, enforce_speed: bool) -> str:
        if not self.gate_met:
            return "GATE FAILED"
        if self.met:
            return "met"
        return "MISSED" if (enforce_speed or not self.speed) else "missed (reported)"

    def fails(self, enforce_speed: bool) -> bool:
        return not self.gate_met or (not self.met and (enforce_speed or not self.speed))

    def row(self, enforce_speed: bool) -> tuple[str, ...]:
        cmp = ">=" if self.higher else "<="
        goal = f"{cmp} {self.goal:g}{self.unit}"
        gate = "" if self.gate is None else f"{cmp} {self.gate:g}{self.unit}"
        return (self.name, goal, f"{self.measured:.6g}{self.unit}",
                f"{self.margin:+.3g}{self.unit}", gate, self.status(enforce_speed))


@dataclass
class TargetBook:
    """Every target checked in one pytest session, in order; prints as one table."""

    enforce_speed: bool = False
    targets: list[Target] = field(default_factory=list)

    def check(self, target: Target, detail: str = "") -> None:
        """Record `target`; fail the calling test when it misses (see the module docstring)."""
        self.targets.append(target)
        if target.fails(self.enforce_speed):
            _, goal, measured, margin, gate, status = target.row(self.enforce_speed)
            bound = f"gate {gate}" if status == "GATE FAILED" else f"target {goal}"
            pytest.fail(f"{target.name}: {measured} against {bound} ({status}). {detail}".strip(),
                        pytrace=False)

    def table(self) -> list[str]:
        """The rows as aligned text lines, header first."""
        head = ("target", "goal", "measured", "margin", "gate", "status")
        rows = [head] + [t.row(self.enforce_speed) for t in self.targets]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
