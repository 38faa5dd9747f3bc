"""TEST-ONLY fault injection into an API rollout (docs/reliability.md): the seam the
coordinator calls at each step, and the plan that kills or pauses the control plane there."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from clustercert.errors import ConfigError

__all__ = [
    "CA_STEPS",
    "FAULT_ENV",
    "FAULT_STEPS",
    "ROLLOUT_STEPS",
    "FaultPlan",
    "Seam",
    "no_seam",
    "seam_for",
]

log = logging.getLogger("clustercert.rollout")

Seam = Callable[[str, str], Awaitable[None]]  # (step, the node it happened on or "")

FAULT_ENV = "CLUSTERCERT_FAULT"
# The steps of an API rollout (control/rollout.py).
ROLLOUT_STEPS = ("after_validation", "after_trust", "during_stage", "after_decision",
                 "during_commit", "before_response")  # fmt: skip
# The internal CA rotation (control/carotation.py): each phase's work is done on every node,
# the move to the next phase is not recorded yet.
CA_STEPS = ("ca_trusting", "ca_reissuing", "ca_switching", "ca_retiring")
FAULT_STEPS = ROLLOUT_STEPS + CA_STEPS


class FaultPlan:
    """TEST-ONLY fault injection at one step of an API rollout (docs/reliability.md).

    ``CLUSTERCERT_FAULT=<step>`` makes the control plane SIGKILL itself the first time a
    rollout reaches ``<step>``; ``CLUSTERCERT_FAULT=pause:<step>`` makes every rollout that
    reaches it create ``<marker_dir>/fault-paused-<step>`` (two lines: the control plane's pid
    and the node the step happened on, if any) and wait (at most ``pause_limit`` seconds) until
    that file is deleted, so a test can act on the nodes at that exact moment.
    Steps: after_validation (lock taken, nothing written), after_trust (a new root is pinned
    on every node, not yet recorded; only rollouts with a trust phase reach it), during_stage
    (the first node has staged), after_decision, during_commit (the first node has
    committed), before_response (everything done, lock released), and for the internal CA
    rotation ca_trusting, ca_reissuing, ca_switching, ca_retiring (the phase's work is done on
    every node, the next phase is not recorded yet). The reconciler never reaches a seam.
    """

    def __init__(
        self, step: str, *, pause: bool, marker_dir: Path, pause_limit: float = 120.0
    ) -> None:
        if step not in FAULT_STEPS:
            raise ConfigError(
                f"{FAULT_ENV}: unknown step {step!r}; expected one of {', '.join(FAULT_STEPS)}, "
                "optionally prefixed with 'pause:'"
            )
        self.step = step
        self.pause = pause
        self.marker = marker_dir / f"fault-paused-{step}"
        self.pause_limit = pause_limit

    @classmethod
    def parse(cls, spec: str, marker_dir: Path) -> FaultPlan:
        pause, _, step = spec.strip().rpartition(":")
        if pause not in ("", "pause"):
            raise ConfigError(f"{FAULT_ENV}: expected STEP or pause:STEP, got {spec!r}")
        return cls(step, pause=pause == "pause", marker_dir=marker_dir)

    def describe(self) -> str:
        return f"{'pause' if self.pause else 'SIGKILL'} at {self.step}"

    async def reached(self, step: str, node: str = "") -> None:
        if step != self.step:
            return
        if not self.pause:
            log.critical("TEST-ONLY fault injection: SIGKILL at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"{os.getpid()}\n{node}\n")
        log.warning(
            "TEST-ONLY fault injection: paused at %s until %s is deleted", step, self.marker
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pause_limit
        while self.marker.exists() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.marker.unlink(missing_ok=True)


async def no_seam(step: str, node: str = "") -> None:
    """The seam of a run without fault injection (and of the reconciler): does nothing."""
    return None


def seam_for(fault: FaultPlan | None) -> Seam:
    """One rollout's fault seam: each step fires at most once per rollout."""
    if fault is None:
        return no_seam
    fired: set[str] = set()

    async def seam(step: str, node: str = "") -> None:
        if step not in fired:
            fired.add(step)
            await fault.reached(step, node)

    return seam
