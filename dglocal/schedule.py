"""Many generations, one forward per denoising step.

Each generation is a `generate.stream_calls` generator: it runs its own sampler and early stop, and yields an
EncodeCall for its prompt and each commit, a DenoiseCall for each decoder pass. `StepScheduler.tick` gathers
the pending calls of every active generation: the encodes go through llama_decode together
(`Model.encode_batch`), the denoise passes through one batched pass (`Model.denoise_batch`), so N active
generations cost one forward per step instead of N. A generation that finishes leaves; a new one joins at the
next tick; one that is cancelled is closed (its sequence keeps the committed blocks only).

    completions = dglocal.schedule.generate_many(model, prompts, seed=0, max_new_tokens=64)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, DglocalError
from .generate import CALLS, Completion, DenoiseCall, EncodeCall, stream_calls


def derive_seed(seed: int, index: int) -> int:
    """The seed of request `index` under a run seed: its noise does not depend on what shares its forwards."""
    words = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


@dataclass(eq=False)
class Job:
    """One generation in the scheduler."""

    events: Iterator
    on_event: Callable
    pending: DenoiseCall | EncodeCall | None = None
    done: bool = False
    error: BaseException | None = None
    tag: object = None  # the caller's


@dataclass
class StepScheduler:
    model: object
    jobs: list[Job] = field(default_factory=list)

    def add(self, events: Iterator, on_event: Callable = lambda e: None, tag=None) -> Job:
        """Start a generation (a stream_calls generator); its events go to on_event as they come."""
        job = Job(events, on_event, tag=tag)
        self._advance(job, None)
        if not job.done:
            self.jobs.append(job)
        return job

    def cancel(self, job: Job) -> None:
        if not job.done:
            job.events.close()
            job.done, job.pending = True, None
        self.jobs = [j for j in self.jobs if j is not job]

    def tick(self) -> list[Job]:
        """The encoder passes the generations wait for (prompts, commits) in one batch, then one batched decoder
        pass for every active generation; returns the jobs that ended in it."""
        encodes = [j for j in self.jobs if isinstance(j.pending, EncodeCall)]
        if encodes:
            self._encode(encodes)
        active = [j for j in self.jobs if isinstance(j.pending, DenoiseCall)]
        if active:
            results = self.model.denoise_batch([j.pending.request() for j in active])
            for job, result in zip(active, results):
                self._advance(job, result)
        ended = [j for j in self.jobs if j.done]
        self.jobs = [j for j in self.jobs if not j.done]
        return ended

    def _encode(self, jobs: list[Job]) -> None:
        try:
            EncodeCall.run_batch(self.model, [j.pending for j in jobs])
        except DglocalError:  # one of them does not fit its context, say: run them one by one, each its own fate
            for job in jobs:
                try:
                    job.pending.run()
                except Exception as e:  # noqa: BLE001
                    self._advance(job, None, error=e)
                else:
                    self._advance(job, None)
            return
        for job in jobs:
            self._advance(job, None)

    def _advance(self, job: Job, result, error: BaseException | None = None) -> None:
        """Run a generation up to its next call (or its end), handing its events over on the way; `error` is
        raised inside it (its cleanup runs, the error ends it)."""
        try:
            item = job.events.throw(error) if error is not None else job.events.send(result)
            while not isinstance(item, CALLS):
                job.on_event(item)
                item = job.events.send(None)
            job.pending = item
        except StopIteration:
            job.done, job.pending = True, None
        except Exception as e:  # noqa: BLE001 (one generation's failure, e.g. its context is full, ends it alone)
            job.events.close()
            job.done, job.pending, job.error = True, None, e


def run_jobs(model, specs: Sequence[tuple[object, dict]], *, on_event: Callable | None = None) -> list[Completion]:
    """Generate for every (prompt, options) in `specs`, up to model.n_seq_max at a time, each on its own
    sequence; returns the Completions in input order. on_event(index, event) sees every event."""
    results: list[Completion | None] = [None] * len(specs)
    waiting = deque(range(len(specs)))
    free = deque(range(model.n_seq_max))
    sched = StepScheduler(model)

    def collector(i):
        def collect(event):
            if isinstance(event, Completion):
                results[i] = event
            if on_event is not None:
                on_event(i, event)
        return collect

    def finish(job):
        free.append(job.tag[1])
        if job.error is not None:
            for j in sched.jobs:
                sched.cancel(j)
            raise job.error

    while waiting or sched.jobs:
        while waiting and free:
            i, seq_id = waiting.popleft(), free.popleft()
            prompt, options = specs[i]
            events = stream_calls(model, prompt, seq=model.sequence(seq_id), **options)
            job = sched.add(events, collector(i), tag=(i, seq_id))
            if job.done:
                finish(job)
        for job in sched.tick():
            finish(job)
    return results


def generate_many(model, prompts: Sequence, *, seed: int | None = None, **options) -> list[Completion]:
    """Model.generate for every prompt, batched: with a seed, prompt i draws its noise from (seed, i), so its
    result is the same whatever the batch size or the other prompts."""
    if isinstance(prompts, (str, bytes)):
        raise ConfigError("generate_many takes a list of prompts")
    base = model.next_seed() if seed is None else seed
    return run_jobs(model, [(p, dict(options, seed=derive_seed(base, i))) for i, p in enumerate(prompts)])
