"""Alert notifications to an operator's webhook: a JSON POST on every raise and every clear.

Delivery never blocks whoever raises the alert: :meth:`WebhookNotifier.notify` only queues.
One background task delivers in order (a receiver sees a clear after its raise), retrying a
connection failure, a 5xx or a 429 with exponential backoff, up to ``max_attempts``. Other 4xx
answers are final (the receiver refuses the body; retrying would not change that). The queue is
bounded: when it is full the oldest notification is dropped, since the newest state matters
most. httpx errors stay inside this module; each outcome is reported to ``observe`` (a metric).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["Notification", "WebhookNotifier"]

log = logging.getLogger("clustercert.webhook")


@dataclass(frozen=True)
class Notification:
    url: str
    body: dict[str, Any]

    @property
    def what(self) -> str:
        """For log lines: the alert and its state, never the URL's query (it may hold a token)."""
        return f"{self.body.get('name', '?')} {self.body.get('state', '?')}"


class WebhookNotifier:
    """Queue notifications with :meth:`notify`; :meth:`run` delivers them until cancelled."""

    def __init__(
        self,
        verify: ssl.SSLContext,
        *,
        max_queue: int = 100,
        max_attempts: int = 8,
        first_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 10.0,
        observe: Callable[[str], None] = lambda result: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.verify = verify
        self.max_attempts = max_attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.observe = observe
        self.sleep = sleep
        self.queue: asyncio.Queue[Notification] = asyncio.Queue(maxsize=max_queue)

    def notify(self, url: str, body: dict[str, Any]) -> None:
        """Queue one POST of ``body`` to ``url``; returns at once. Drops the oldest queued
        notification when the queue is full."""
        notification = Notification(url, body)
        if self.queue.full():
            dropped = self.queue.get_nowait()
            self.queue.task_done()
            self.observe("dropped")
            log.warning("webhook queue full: dropped the notification %s", dropped.what)
        self.queue.put_nowait(notification)

    async def run(self) -> None:
        """Deliver queued notifications in order, forever (cancel to stop)."""
        async with httpx.AsyncClient(
            verify=self.verify, timeout=self.timeout, follow_redirects=False
        ) as client:
            while True:
                notification = await self.queue.get()
                try:
                    self.observe(await self._deliver(client, notification))
                finally:
                    self.queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, notification: Notification) -> str:
        delay = self.first_delay
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await client.post(
                    notification.url,
                    json=notification.body,
                    headers={"User-Agent": "clustercert-alerts"},
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    log.info("webhook: delivered %s", notification.what)
                    return "ok"
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    log.error("webhook refused %s (%s); not retried", notification.what, problem)
                    return "refused"
            if attempt < self.max_attempts:
                log.warning(
                    "webhook: %s not delivered (%s); attempt %d of %d in %.1f s",
                    notification.what, problem, attempt + 1, self.max_attempts, delay,
                )  # fmt: skip
                await self.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        log.error("webhook: gave up on %s after %d attempts", notification.what, self.max_attempts)
        return "failed"
