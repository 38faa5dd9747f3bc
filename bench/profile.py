"""Optional sampling profiles of the control plane and one agent during a batch of rotations
(``--profile DIR``), taken with py-spy (``pip install py-spy``) in its raw collapsed-stack format
(one line per stack, ``frame;frame;... count``), which flamegraph tools and ``sort`` read."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["py_spy", "top_frames"]


def _py_spy_binary() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/python -m pip install py-spy")
    return found


@contextlib.contextmanager
def py_spy(directory: Path, pids: Mapping[str, int], rate: int = 250) -> Iterator[None]:
    """Record ``pids`` (label → pid) while the block runs; write ``DIR/<label>.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = _py_spy_binary()
    recorders = []
    for label, pid in pids.items():
        command = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                   "--output", str(directory / f"{label}.txt")]  # fmt: skip
        recorders.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()


def top_frames(collapsed: Path, limit: int = 25) -> list[tuple[str, float]]:
    """The frames with the most inclusive samples in a collapsed-stack file, as (frame, share)."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + count
    ranked = sorted(inclusive.items(), key=lambda item: -item[1])[:limit]
    return [(frame, count / total) for frame, count in ranked] if total else []
