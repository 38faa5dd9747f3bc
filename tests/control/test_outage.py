"""How a store outage is logged (src/clustercert/control/outage.py): one line down, one line
up, a summary while it lasts; never a traceback. Time is a fake clock."""

from __future__ import annotations

import logging

import pytest

from clustercert.control.outage import StoreOutage
from clustercert.errors import StoreError

ERROR = StoreError(
    "etcd store at http://127.0.0.1:1 (prefix '/c/'): reading 'meta/cluster': cannot reach "
    "etcd (ConnectError: [Errno 111]\nConnection refused)"
)


def test_an_outage_is_one_line_down_summaries_while_down_and_one_line_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    changes: list[bool] = []
    outage = StoreOutage(summary_every=60, clock=lambda: now[0], on_change=changes.append)
    caplog.set_level(logging.INFO, logger="clustercert.store")
    outage.answered()  # up and staying up: nothing said
    assert caplog.records == []

    for _ in range(59):  # every loop fails every second for a minute
        outage.failed(ERROR, "reconciling the nodes")
        outage.failed(ERROR, "refreshing the api listener")
        now[0] += 1
    assert outage.down
    (down,) = [r.getMessage() for r in caplog.records]
    assert down == (
        "store unavailable (reconciling the nodes): etcd store at http://127.0.0.1:1 (prefix "
        "'/c/'): reading 'meta/cluster': cannot reach etcd (ConnectError: [Errno 111] "
        "Connection refused)"
    )
    now[0] += 1
    outage.failed(ERROR, "reconciling the nodes")
    summary = caplog.records[-1].getMessage()
    assert summary.startswith("store still unavailable after 60 s (119 failed calls); last: ")
    now[0] += 5
    outage.answered()
    outage.answered()
    assert not outage.down
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[-1] == "store available again after 65.0 s (119 failed calls meanwhile)"
    assert all(r.exc_info is None for r in caplog.records)
    assert changes == [False, True]
