"""The alert webhook notifier (control/webhook.py) against a real HTTPS receiver on loopback.

Backoff delays are parameters (milliseconds here), never waited out at their production size.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from webhook_receiver import Receiver, webhook_receiver

from clustercert.control.webhook import WebhookNotifier


def _notifier(receiver: Receiver, results: list[str], **options: Any) -> WebhookNotifier:
    return WebhookNotifier(
        ssl.create_default_context(cafile=str(receiver.ca_file)),
        first_delay=0.01,
        max_delay=0.05,
        observe=results.append,
        **options,
    )


def _run(notifier: WebhookNotifier, work: Callable[[], Awaitable[None]]) -> None:
    """Run the notifier's loop around ``work``, then until its queue is empty (bounded)."""

    async def main() -> None:
        task = asyncio.create_task(notifier.run())
        try:
            await work()
            await asyncio.wait_for(notifier.queue.join(), 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def _body(state: str) -> dict[str, Any]:
    return {"cluster": "cluster.local", "name": "cluster_certs_about_to_expire", "state": state}


def test_raise_and_clear_arrive_in_order_after_the_receiver_first_fails() -> None:
    with webhook_receiver(script=[500, 503]) as receiver:
        results: list[str] = []
        notifier = _notifier(receiver, results)

        async def work() -> None:
            notifier.notify(receiver.url, _body("raised"))
            notifier.notify(receiver.url, _body("cleared"))

        _run(notifier, work)
        accepted = receiver.wait_for(2)
    assert [b["state"] for b in accepted] == ["raised", "cleared"]
    # The raise was tried three times (500, 503, 200), the clear once.
    assert [b["state"] for b in receiver.received] == ["raised"] * 3 + ["cleared"]
    assert results == ["ok", "ok"]


def test_a_4xx_is_final_and_the_next_notification_still_goes_out() -> None:
    with webhook_receiver(script=[400]) as receiver:
        results: list[str] = []
        notifier = _notifier(receiver, results)

        async def work() -> None:
            notifier.notify(receiver.url, _body("raised"))
            notifier.notify(receiver.url, _body("cleared"))

        _run(notifier, work)
    assert [b["state"] for b in receiver.received] == ["raised", "cleared"]
    assert results == ["refused", "ok"]


def test_gives_up_after_max_attempts() -> None:
    with webhook_receiver(script=[500] * 10) as receiver:
        results: list[str] = []
        notifier = _notifier(receiver, results, max_attempts=3)

        async def work() -> None:
            notifier.notify(receiver.url, _body("raised"))

        _run(notifier, work)
    assert len(receiver.received) == 3 and receiver.accepted == []
    assert results == ["failed"]


def test_an_untrusted_receiver_is_never_sent_the_body() -> None:
    """The notifier verifies the receiver's certificate: a receiver it does not trust gets a
    failed handshake, never the alert."""
    with webhook_receiver() as receiver:
        results: list[str] = []
        notifier = WebhookNotifier(
            ssl.create_default_context(),  # system CAs only: the test CA is unknown
            max_attempts=2,
            first_delay=0.01,
            observe=results.append,
        )

        async def work() -> None:
            notifier.notify(receiver.url, _body("raised"))

        _run(notifier, work)
    assert receiver.received == [] and results == ["failed"]


def test_notify_never_waits_and_a_full_queue_drops_the_oldest() -> None:
    """With nobody delivering, notify() still returns at once; the queue keeps the newest."""
    results: list[str] = []

    async def main() -> None:
        notifier = WebhookNotifier(
            ssl.create_default_context(), max_queue=2, observe=results.append
        )
        for state in ("raised", "cleared", "raised-again"):
            notifier.notify("https://127.0.0.1:9/", _body(state))
        queued = [notifier.queue.get_nowait().body["state"] for _ in range(2)]
        assert queued == ["cleared", "raised-again"]

    asyncio.run(main())
    assert results == ["dropped"]
