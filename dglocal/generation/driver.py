"""The one driver of generations: each tick, every pending encoder pass goes through llama_decode together
(`Model.encode_batch`) and every pending canvas through one batched decoder pass (`Model.denoise_batch`), so N
active generations cost one forward per step instead of N. A single `stream` is the same driver with one member.
A generation that finishes leaves; a new one joins at the next tick; one that is cancelled is dropped (its
sequence keeps the prompt and the committed blocks). A batched call that fails is retried member by member
(`encode_batch` is all or nothing), so one bad member ends only its own generation.

    completions = generate_many(model, prompts, seed=0, max_new_tokens=64)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, DglocalError
from .events import Completion, Event
from .grammar import CanvasGrammar, GrammarSpec, grammar_options
from .loop import DenoiseCall, EncodeCall, Generation, split_options
from .request import RequestPlan, SeedSource, derive_seed, plan


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
    scales: tuple | None = None  # the LoRA scales served now
    holding: list = field(default_factory=list)  # the jobs whose canvases keep `scales` until they end

    def add(self, gen: Generation, on_event: Callable = lambda e: None, tag=None) -> Job:
        job = Job(gen, on_event, tag)
        self.jobs.append(job)
        return job

    def cancel(self, job: Job) -> None:
        job.done = True
        self.jobs = [j for j in self.jobs if j is not job]
        _ended(job)

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
            self._denoise(denoising)
        ended = [j for j in self.jobs if j.done]
        self.jobs = [j for j in self.jobs if not j.done]
        for job in ended:
            _ended(job)
        return ended

    def _lora_turn(self) -> list[Job]:
        """The jobs of this tick: all of them, or, where their LoRA scales differ, those sharing one set of
        scales. A set holds until the canvases that were running when it was chosen have ended (a switch makes
        llama.cpp reserve its graphs again: once a canvas, not once a step); then the turn passes to the next job
        (turns rotate, so none waits for ever). The model is set to the scales served."""
        if not self.jobs:
            return []
        live = [j for j in self.holding if j in self.jobs and _mid_canvas(j)]
        if self.scales is None or not live or not any(j.gen.lora == self.scales for j in self.jobs):
            self.turn %= len(self.jobs)
            self.scales = self.jobs[self.turn].gen.lora
            self.turn += 1
            live = [j for j in self.jobs if j.gen.lora == self.scales]
        self.holding = live
        serving = [j for j in self.jobs if j.gen.lora == self.scales]
        if self.scales:
            self.model.adapters.apply(self.model, self.scales)
        return serving

    def _encode(self, jobs: list[Job]) -> None:
        calls = [(j.gen.pending.seq, j.gen.pending.tokens) for j in jobs]
        held = [len(seq.tokens) for seq, _ in calls]
        try:
            self.model.encode_batch(calls)
        except DglocalError:  # one of them does not fit its context, say: run them one by one, each its own fate
            for job, call, n in zip(jobs, calls, held):
                try:
                    if len(call[0].tokens) != n:  # encode_batch could not take its part back: never encode twice
                        raise DglocalError(f"the failed batch left sequence {call[0].seq_id} at "
                                           f"{len(call[0].tokens)} tokens instead of {n}")
                    self.model.encode_batch([call])
                except Exception as e:  # noqa: BLE001
                    job.done, job.error = True, e
                else:
                    self._take(job, None)
            return
        for job in jobs:
            self._take(job, None)

    def _denoise(self, jobs: list[Job]) -> None:
        try:
            results = self.model.denoise_batch([j.gen.pending.request() for j in jobs])
        except DglocalError:  # one bad canvas (its filters, its room in the cache): each alone, its own fate
            if len(jobs) == 1:
                raise
            for job in jobs:
                try:
                    result = self.model.denoise_batch([job.gen.pending.request()])[0]
                except Exception as e:  # noqa: BLE001
                    job.done, job.error = True, e
                else:
                    self._take(job, result)
            return
        for job, result in zip(jobs, results):
            self._take(job, result)

    def _take(self, job: Job, result) -> None:
        try:
            events = job.gen.take(result)
        except Exception as e:  # noqa: BLE001 (one generation's failure, a guide's error say, ends it alone)
            job.done, job.error = True, e
            return
        for event in events:
            job.on_event(event)
        job.done = job.gen.pending is None


def _ended(job: Job) -> None:
    """A job left the driver: its sequence's cache goes back to its tokens (a last canvas is never committed,
    and the fast sampler keeps cells of it)."""
    end = getattr(job.gen.seq, "end_canvas", None)
    if end is not None:
        end()


def _mid_canvas(job: Job) -> bool:
    """Its next pass continues a canvas (self-conditioned on the last): not its first step, not an encode."""
    call = job.gen.pending
    return isinstance(call, DenoiseCall) and call.self_condition


@dataclass
class Prepared:
    """A request made ready for any sequence: its plan (prompt tokens, images encoded, settings, seed) and
    Generation's own options with the grammar compiled. Preparing touches no cache: it may run on any thread."""

    plan: RequestPlan
    own: dict


def prepare(model, prompt, **options) -> Prepared:
    """The one preparation of a request, for the Python API, the chat and the server: options are the plan's
    (GenerationConfig fields, `seeds` for a None seed, cache_prompt, images) and Generation's own (noise,
    constraints, guide, guide_restarts, grammar, with the shorthands json_schema= and regex=). A grammar the
    engine cannot use is a ConfigError whose `param` is "grammar"."""
    settings, own = split_options(grammar_options(options))
    request_plan = plan(model, prompt, **settings)
    if isinstance(own.get("grammar"), GrammarSpec):
        try:
            own["grammar"] = CanvasGrammar(model, own["grammar"], request_plan.eos_ids,
                                           max_tokens=request_plan.config.max_new_tokens)
        except ConfigError as e:
            e.param = "grammar"
            raise
    return Prepared(request_plan, own)


def attach(model, prepared: Prepared, seq) -> Generation:
    """The prepared request on `seq` (held by the caller): what the cache shares with the prompt is kept, the
    first call is pending. A Prepared is attached once (its grammar follows one generation)."""
    return Generation(model, prepared.plan, seq, **prepared.own)


def start(model, prompt, seq, **options) -> Generation:
    """A Generation of `prompt` on `seq`: prepare, then attach."""
    return attach(model, prepare(model, prompt, **options), seq)


def stream(model, prompt, *, seq=None, **options) -> Iterator[Event]:
    """Generate after `prompt` (text or token ids) on `seq` (default: a fresh sequence of `model`): yields every
    Step, a BlockText per block and the Completion. Only what follows the longest common prefix with what `seq`
    holds is encoded. Options: see `start`."""
    own = model.sequence() if seq is None else None  # a lease of its own, given back however the stream ends
    job = None
    try:
        gen = start(model, prompt, seq if own is None else own, **options)
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
    finally:
        if job is not None and not job.done:  # dropped mid-generation (the caller stopped iterating)
            driver.cancel(job)
        if own is not None:
            own.release()


def generate(model, prompt, **options) -> Completion:
    """Run `stream` to the end and return its Completion."""
    for event in stream(model, prompt, **options):
        pass
    return event


def run_many(model, specs: Sequence[tuple[object, dict]], *, on_event: Callable | None = None,
             sequences: Sequence | None = None) -> list[Completion]:
    """Generate for every (prompt, options) in `specs`, as many at a time as there are `sequences` (default: the
    model's free ones, leased for the call), each on its own; returns the Completions in input order.
    on_event(index, event) sees every event."""
    results: list[Completion | None] = [None] * len(specs)
    waiting = deque(range(len(specs)))
    leased = sequences is None
    if leased:
        sequences = lease_free(model, len(specs))
    try:
        _run_many(model, specs, on_event, results, waiting, deque(sequences))
    finally:
        for seq in sequences if leased else ():
            seq.release()
    return results


def lease_free(model, n: int) -> list:
    """Up to n of the model's free sequences (at least one: ConfigError when every one is held)."""
    out = [model.sequence()]
    while len(out) < n and len(model.held()) < model.n_seq_max:
        out.append(model.sequence())
    return out


def _run_many(model, specs, on_event, results, waiting, free) -> None:
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
            i, seq = waiting.popleft(), free.popleft()
            prompt, options = specs[i]
            seq.rewind(0)  # an earlier generation's cache: this one shares nothing with it
            driver.add(start(model, prompt, seq, **options), collector(i), tag=seq)
        for job in driver.tick():
            free.append(job.tag)
            if job.error is not None:
                for other in list(driver.jobs):
                    driver.cancel(other)
                raise job.error


def generate_many(model, prompts: Sequence, *, seed: int | None = None, seeds: SeedSource | None = None,
                  sequences: Sequence | None = None, **options) -> list[Completion]:
    """`generate` for every prompt, batched: prompt i draws its noise from (seed, i), so its result is the same
    whatever the batch size or the other prompts. Without a seed, the run's seed is drawn from `seeds`."""
    if isinstance(prompts, (str, bytes)):
        raise ConfigError("generate_many takes a list of prompts")
    base = (seeds or SeedSource()).next() if seed is None else seed
    return run_many(model, [(p, dict(options, seed=derive_seed(base, i))) for i, p in enumerate(prompts)],
                    sequences=sequences)
