"""Live events for ``/ws/live``: a cluster-wide hub actor and a per-replica fan-out.

* :class:`LiveHub` (a named, detached Ray actor) is where events enter: generation events from the
  Generator replicas, training steps POSTed to ``/research/training-step``. It keeps a bounded
  history (recent events, and training steps per run for late subscribers and
  ``/research/metrics``) and serves long-polls.
* Every ingress replica long-polls the hub and hands events to its :class:`Broadcaster`, which fans
  out to that replica's WebSocket subscribers. Each subscriber has a bounded queue; one whose queue
  overflows (it does not read, or reads too slowly) is dropped — closed with code 1008 — and the
  others never wait for it.
* Events that carry an ``owner`` (generations, training steps) reach only that owner's
  subscribers; events without one (serving metrics) reach everyone.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


# ================================================================================== hub (actor)
class LiveHub:
    """Event history + long-poll. Run as a Ray actor via :func:`get_hub`."""

    def __init__(self, max_events: int = 2000, max_steps_per_run: int = 20_000):
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self.steps: dict[str, collections.deque[dict[str, Any]]] = {}
        self.max_steps = max_steps_per_run
        self.seq = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def publish(self, event: dict[str, Any]) -> int:
        self.seq += 1
        event = {**event, "seq": self.seq}
        event.setdefault("ts", time.time())
        self.events.append(event)
        if event.get("type") == "training_step":
            run = str(event.get("run_id", "default"))
            self.steps.setdefault(run, collections.deque(maxlen=self.max_steps)).append(event)
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return self.seq

    async def poll(self, after: int, timeout_s: float = 10.0) -> tuple[int, list[dict[str, Any]]]:
        """Events with seq > ``after`` (waits up to ``timeout_s`` for one). Returns (last seq, events)."""
        if self.seq <= after:
            cond = self._condition()
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self.seq > after), timeout_s)
                except asyncio.TimeoutError:
                    return self.seq, []
        return self.seq, [e for e in self.events if e["seq"] > after]

    async def last_seq(self) -> int:
        return self.seq

    async def training_steps(self, run_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        runs = [run_id] if run_id else list(self.steps)
        out = [e for r in runs for e in list(self.steps.get(r, ()))[-limit:]]
        return sorted(out, key=lambda e: e["seq"])[-limit:]

    async def summary(self) -> dict[str, Any]:
        runs = {r: {"steps": len(d), "last": d[-1] if d else None} for r, d in self.steps.items()}
        return {"events": self.seq, "runs": runs}


def get_hub(namespace: str, name: str):
    """The hub actor (created on first use)."""
    import ray

    return ray.remote(LiveHub).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached", max_restarts=-1,
        max_task_retries=-1, num_cpus=0, max_concurrency=1000).remote()


# ================================================================================== fan-out
@dataclass(eq=False)
class Subscriber:
    id: int
    queue: asyncio.Queue
    owner: str | None = None  # None: every event (in-process consumers, tests)
    dropped: bool = False
    task: asyncio.Task | None = None  # the sender; cancelled when the subscriber is dropped
    sent: int = 0
    created: float = field(default_factory=time.time)

    def wants(self, event: dict[str, Any]) -> bool:
        """An event without an owner is global; one with an owner is that owner's alone."""
        event_owner = event.get("owner")
        return event_owner is None or self.owner is None or event_owner == self.owner


class Broadcaster:
    """Fan-out of events to WebSocket subscribers, each behind a bounded queue."""

    def __init__(self, queue_size: int = 256):
        self.queue_size = queue_size
        self.subs: dict[int, Subscriber] = {}
        self._ids = itertools.count(1)
        self.published = 0
        self.dropped = 0

    def subscribe(self, owner: str | None = None) -> Subscriber:
        sub = Subscriber(next(self._ids), asyncio.Queue(self.queue_size), owner)
        self.subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subs.pop(sub.id, None)

    def publish(self, event: dict[str, Any]) -> int:
        """Queue ``event`` for every subscriber it is for, without waiting; returns how many got it."""
        self.published += 1
        n = 0
        for sub in list(self.subs.values()):
            if not sub.wants(event):
                continue
            try:
                sub.queue.put_nowait(event)
                n += 1
            except asyncio.QueueFull:
                self.drop(sub)
        return n

    def drop(self, sub: Subscriber) -> None:
        if sub.dropped:
            return
        sub.dropped = True
        self.dropped += 1
        self.unsubscribe(sub)
        if sub.task is not None:
            sub.task.cancel()

    async def pump(self, sub: Subscriber, send, send_timeout_s: float = 10.0) -> None:
        """Send ``sub``'s queued events with ``send(event)`` until cancelled; a send that takes
        longer than ``send_timeout_s`` (a client that stopped reading) drops the subscriber."""
        while True:
            event = await sub.queue.get()
            try:
                await asyncio.wait_for(send(event), send_timeout_s)
            except asyncio.TimeoutError:
                self.drop(sub)
                return
            sub.sent += 1

    def stats(self) -> dict[str, int]:
        return {"subscribers": len(self.subs), "published": self.published, "dropped": self.dropped}
