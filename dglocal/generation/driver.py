"""The one driver of generations: each tick, every pending encoder pass goes through llama_decode together
(`Model.encode_batch`) and every pending canvas through one batched decoder pass (`Model.denoise_batch`), so N
active generations cost one forward per step instead of N. A single `stream` is the same driver with one member.
A generation that finishes leaves; a new one joins at the next tick; one that is cancelled is dropped (its
sequence keeps the prompt and the committed blocks).

    completions = generate_many(model, prompts, seed=0, max_new_tokens=64)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, DglocalError
from .events import Completion, Event
from .grammar import grammar_options
from .loop import DenoiseCall, EncodeCall, Generation, split_options
from .request import SeedSource, derive_seed, plan


@dataclass(eq=False)
class Job:
    """One generation in the driver; its events go to on_event as they come."""

    gen: Generation
    on_event: Callable[[Event], None]
    tag: object = None  # the caller's
    done: bool = False
    error: BaseException | None = None


@dataclass
class Driver:
    model: object
    jobs: list[Job] = field(default_factory=list)
    turn: int = 0  # whose LoRA scales the next tick serves, when generations differ in them

    def add(self, gen: Generation, on_event: Callable = lambda e: None, tag=None) -> Job:
        job = Job(gen, on_event, tag)
        self.jobs.append(job)
        return job

    def cancel(self, job: Job) -> None:
        job.done = True
        self.jobs = [j for j in self.jobs if j is not job]

    def tick(self) -> list[Job]:
        """The encoder passes the generations wait for (prompts, commits) in one batch, then one batched decoder
        pass for every generation that waits for one; returns the jobs that ended in it. Generations with other
        LoRA scales than those served wait for their own tick (a forward has one set of scales)."""
        serving = self._lora_turn()
        encodes = [j for j in serving if isinstance(j.gen.pending, EncodeCall)]
        if encodes:
            self._encode(encodes)
        denoising = [j for j in serving if not j.done and isinstance(j.gen.pending, DenoiseCall)]
        if denoising:
            results = self.model.denoise_batch([j.gen.pending.request() for j in denoising])
            for job, result in zip(denoising, results):
                self._take(job, result)
        ended = [j for j in self.jobs if j.done]
        self.jobs = [j for j in self.jobs if not j.done]
        return ended

    def _lora_turn(self) -> list[Job]:
        """The jobs of this tick: all of them, or, where their LoRA scales differ, those sharing the scales of
        the job whose turn it is (turns rotate, so none waits for ever); the model is set to those scales."""
        if not self.jobs:
            return []
        self.turn %= len(self.jobs)
        scales = self.jobs[self.turn].gen.lora
        self.turn += 1
        serving = [j for j in self.jobs if j.gen.lora == scales]
        if scales:
            self.model.adapters.apply(self.model, scales)
        return serving

    def _encode(self, jobs: list[Job]) -> None:
        try:
            self.model.encode_batch([(j.gen.pending.seq, j.gen.pending.tokens) for j in jobs])
        except DglocalError:  # one of them does not fit its context, say: run them one by one, each its own fate
            for job in jobs:
                try:
                    self.model.encode_batch([(job.gen.pending.seq, job.gen.pending.tokens)])
                except Exception as e:  # noqa: BLE001
                    job.done, job.error = True, e
                else:
                    self._take(job, None)
            return
        for job in jobs:
            self._take(job, None)

    def _take(self, job: Job, result) -> None:
        try:
            events = job.gen.take(result)
        except Exception as e:  # noqa: BLE001 (one generation's failure, a guide's error say, ends it alone)
            job.done, job.error = True, e
            return
        for event in events:
            job.on_event(event)
        job.done = job.gen.pending is None


def start(model, prompt, seq, **options) -> Generation:
    """A Generation of `prompt` on `seq`: options are the plan's (GenerationConfig fields, `seeds` for a None
    seed, cache_prompt) and Generation's own (noise, constraints, guide, guide_restarts, grammar, with the
    shorthands json_schema= and regex=)."""
    settings, own = split_options(grammar_options(options))
    return Generation(model, plan(model, prompt, **settings), seq, **own)


def stream(model, prompt, *, seq=None, **options) -> Iterator[Event]:
    """Generate after `prompt` (text or token ids) on `seq` (default: a fresh sequence of `model`): yields every
    Step, a BlockText per block and the Completion. Only what follows the longest common prefix with what `seq`
    holds is encoded. Options: see `start`."""
    gen = start(model, prompt, seq if seq is not None else model.sequence(), **options)
    driver, events = Driver(model), deque()
    job = driver.add(gen, events.append)
    while True:
        while events:
            yield events.popleft()
        if job.done:
            break
        driver.tick()
    if job.error is not None:
        raise job.error


def generate(model, prompt, **options) -> Completion:
    """Run `stream` to the end and return its Completion."""
    for event in stream(model, prompt, **options):
        pass
    return event


def run_many(model, specs: Sequence[tuple[object, dict]], *, on_event: Callable | None = None) -> list[Completion]:
    """Generate for every (prompt, options) in `specs`, up to model.n_seq_max at a time, each on its own
    sequence; returns the Completions in input order. on_event(index, event) sees every event."""
    results: list[Completion | None] = [None] * len(specs)
    waiting = deque(range(len(specs)))
    free = deque(range(model.n_seq_max))
    driver = Driver(model)

    def collector(i):
        def collect(event):
            if event.kind == "done":
                results[i] = event
            if on_event is not None:
                on_event(i, event)
        return collect

    while waiting or driver.jobs:
        while waiting and free:
            i, seq_id = waiting.popleft(), free.popleft()
            prompt, options = specs[i]
            driver.add(start(model, prompt, model.sequence(seq_id), **options), collector(i), tag=seq_id)
        for job in driver.tick():
            free.append(job.tag)
            if job.error is not None:
                for other in list(driver.jobs):
                    driver.cancel(other)
                raise job.error
    return results


def generate_many(model, prompts: Sequence, *, seed: int | None = None, seeds: SeedSource | None = None,
                  **options) -> list[Completion]:
    """`generate` for every prompt, batched: prompt i draws its noise from (seed, i), so its result is the same
    whatever the batch size or the other prompts. Without a seed, the run's seed is drawn from `seeds`."""
    if isinstance(prompts, (str, bytes)):
        raise ConfigError("generate_many takes a list of prompts")
    base = (seeds or SeedSource()).next() if seed is None else seed
    return run_many(model, [(p, dict(options, seed=derive_seed(base, i))) for i, p in enumerate(prompts)])
