"""The serving engine: slots with their own KV caches, a bounded queue, one denoising step per tick for all.

One thread owns the model. Each tick it admits waiting requests into free slots (the slot whose cached tokens
share the longest prefix with the prompt, as llama-server picks them: a conversation's next turn encodes only its
new tokens), drops cancelled ones, and advances every active generation by one step in one batched forward
(dglocal.generation.driver). Events go back to each request's asyncio queue on its event loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

from dglocal.errors import DglocalError
from dglocal.generation.driver import Driver, Job, Prepared, attach
from dglocal.generation.request import pick_slot

END = object()  # the last item of a request's queue after its Completion (or its error)
QUEUE = 512  # requests waiting for a slot by default: a burst is held, as ollama holds one (--queue bounds it)


class ShuttingDown(DglocalError):
    """The error a request still open when the server stops ends with."""


@dataclass(eq=False)
class Request:
    prepared: Prepared  # made ready off this thread (dglocal.serving.prepare); attached to a slot here
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    slot: int | None = None
    cached: int = 0  # prompt tokens found in the slot's cache
    cancelled: bool = False
    job: Job | None = None

    @property
    def plan(self):
        return self.prepared.plan

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    def __init__(self, model, n_slots: int, queue_size: int):
        self.model = model
        self.slots = [model.sequence() for _ in range(n_slots)]  # the engine's leases, one per slot
        self.busy: list[Request | None] = [None] * n_slots
        self.waiting: deque[Request] = deque()
        self.queue_size = queue_size
        self.driver = Driver(model)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.reason = ShuttingDown("the server is shutting down")  # what the requests still open end with
        self.thread = threading.Thread(target=self._run, name="dglocal-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """shutdown(), then wait for the engine thread to end."""
        self.shutdown()
        self.thread.join(timeout=30)

    def shutdown(self) -> None:
        """Stop now, without waiting (safe from a signal handler): the running pass is aborted (llama.cpp polls
        the flag between graph nodes), and every request still open, running or waiting, ends with a
        ShuttingDown error as its last event."""
        self.stopping = True
        self.model.abort()
        self.wake.set()

    # -- called from request handlers ------------------------------------------------------------------------

    def submit(self, req: Request) -> bool:
        """Queue a request; False when the queue is full."""
        with self.lock:
            if len(self.waiting) >= self.queue_size:
                return False
            self.waiting.append(req)
        self.wake.set()
        return True

    def cancel(self, req: Request) -> None:
        """The client went away: its slot is freed at the next tick, within one denoising step."""
        req.cancelled = True
        self.wake.set()

    def slot_info(self) -> list[dict]:
        return [{"id": i, "busy": r is not None, "request": r.id if r else None, "cached_tokens": len(s.tokens)}
                for i, (s, r) in enumerate(zip(self.slots, self.busy))]

    # -- the engine thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # the requests still open end with the shutdown's reason, within the step that was running
            for job in list(self.driver.jobs):
                self.driver.cancel(job)
                job.error = self.reason
                self._finish(job)
            with self.lock:
                waiting, self.waiting = list(self.waiting), deque()
            for req in waiting:
                req.put(self.reason)
                req.put(END)
            for seq in self.slots:  # nothing half-encoded stays behind the aborted pass
                seq.release()
            self.model.abort(False)  # the model outlives its server (a test, a program that serves again)

    def _loop(self) -> None:
        while not self.stopping:
            self._drop_cancelled()
            self._admit()
            if not self.driver.jobs:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            try:
                ended = self.driver.tick()
            except Exception as e:  # noqa: BLE001 (a failed forward ends the requests in it, not the server)
                if self.stopping:  # the aborted pass: they end with the shutdown's reason
                    return
                ended = list(self.driver.jobs)
                for job in ended:
                    self.driver.cancel(job)
                    job.error = e
            for job in ended:
                if self.stopping and job.error is not None:  # the pass the shutdown aborted
                    job.error = self.reason
                self._finish(job)

    def _admit(self) -> None:
        admitted = []
        with self.lock:
            while self.waiting and None in self.busy:
                req = self.waiting.popleft()
                if req.cancelled:
                    req.put(END)
                    continue
                req.slot = pick_slot({i: self.slots[i] for i, r in enumerate(self.busy) if r is None},
                                     req.plan.tokens)
                self.busy[req.slot] = req
                admitted.append(req)
        for req in admitted:  # outside the lock: a windowed cache may restore a checkpoint here
            try:
                gen = attach(self.model, req.prepared, self.slots[req.slot])
            except Exception as e:  # noqa: BLE001 (this request's failure, not the server's)
                req.job = Job(None, req.put, req, done=True, error=e)
                self._finish(req.job)
                continue
            req.cached = gen.cached
            req.job = self.driver.add(gen, req.put, tag=req)

    def _drop_cancelled(self) -> None:
        for job in list(self.driver.jobs):
            if job.tag.cancelled:
                self.driver.cancel(job)
                self._finish(job)

    def _finish(self, job: Job) -> None:
        req: Request = job.tag
        self.busy[req.slot] = None
        if job.error is not None:
            req.put(job.error)
        req.put(END)
