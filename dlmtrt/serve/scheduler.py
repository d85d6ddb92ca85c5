"""Step-granular batching: cohorts of compatible requests, each one `DecodeSession`, advanced round-robin by one
worker thread that owns the backend.

At every step boundary (after any cohort's step) the waiting requests are grouped by their compatibility key
(family parameters, policy, answer length, prompt-length bucket, BiCache depth) and each group, up to `max_batch`, becomes a
new cohort: one `DecodeSession` whose batch is the group, prompts left-padded to the group's longest as
`generate_text` pads a batch (a request alone is not padded at all: in bf16, padding alone can flip a near-tie). Running cohorts are stepped one step each in turn; a request is answered as soon
as its answer is final (its committed prefix reaches EOS, or nothing is masked: committed tokens never change)
and then leaves its cohort's batch (`DecodeSession.keep`, with the backends whose cache the session owns), as
does a request whose client has gone; a cohort is dropped once none of its requests is waiting for it.

Exactness. A request whose decoding draws no random numbers (temperature 0 and, for Dream, a
confidence-ordered `alg` other than `origin` without `alg_temp`; for LLaDA, `low_confidence` remasking) gives
the same tokens in any batch, so such requests share cohorts. Sampling requests whose every draw is routed per
sequence (the family's `batches_sampling`: Dream's `origin` order, LLaDA's Gumbel noise with low-confidence
remasking, the `none` policy) share cohorts as greedy ones do, each with its own generator seeded with its
`seed` (`row_rng.row_generators` around each step). Any other sampling request runs in a cohort of its own
whose random state is swapped in around each of its steps. Either way its draws are those of `dlmtrt generate
--seed S` with the same prompt, whatever else the server runs meanwhile.

Backends: `torch` and `onnxruntime` allocate a fresh K/V cache for every session; `torch-graph` and `tensorrt`
own one cache buffer per backend, so with those only one cohort runs at a time (`shares_cache`).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from dlmtrt.errors import DlmtrtError
from dlmtrt.runtime import row_rng
from dlmtrt.runtime.backends import shares_cache
from dlmtrt.runtime.buckets import bucket
from dlmtrt.runtime.decode import DecodeSession
from dlmtrt.runtime.families import get as family
from dlmtrt.runtime.families import span_options
from dlmtrt.runtime.generate import answer_end
from dlmtrt.runtime.policies import DecodePlan

log = logging.getLogger("dlmtrt.serve")

def bucket_of(n: int, limit: int) -> int:
    """The prompt-length bucket of a prompt of `n` tokens (runtime/buckets.py, from 16 up), never beyond `limit`:
    prompts in one bucket may share a cohort."""
    return bucket(n, max(limit, n), smallest=16)


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One answer to compute (one prompt of a request). Events go to `sink(job, kind, payload)`, called on the
    worker thread: ("delta", text), ("canvas", dict), ("done", result dict), ("error", (status, message))."""

    ids: list[int]
    params: dict
    plan: DecodePlan
    seed: int
    random: bool
    new_tokens: int
    sink: object  # callable(job, kind, payload)
    stream: bool = False
    canvas: bool = False
    index: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    emitted: str = ""  # text already streamed
    last_prefix: int = -1
    prefix_len: int = 0  # where a chat's shared prefix ends (runtime/bicache.chat_prefix); 0: no boundary
    depth: int = 0  # the BiCache depth it runs at (serve/reuse.py); 0: without BiCache
    constraints: dict | None = None  # {answer position: token id} pinned (runtime/constraints.py)
    answer_start: int | None = None  # +prophet's span, in answer positions
    gen: object = None  # its own torch.Generator, in a batched sampling cohort

    def key(self, max_positions: int | None, family_name: str | None = None) -> tuple:
        """Jobs of one key may share a cohort: the same parameters, policy, prompt-length bucket and BiCache
        depth (BiCache decodes one depth per batch); sampling jobs only where their draws are per sequence
        (`row_random`), the others alone."""
        limit = (max_positions or 1 << 30) - self.new_tokens
        if self.random and not self.row_random(family_name):
            return ("solo", self.id, len(self.ids))
        return (json.dumps(self.params, sort_keys=True), self.plan.spec, bucket_of(len(self.ids), limit), self.depth,
                json.dumps(sorted((self.constraints or {}).items())), self.answer_start)

    def row_random(self, family_name: str | None) -> bool:
        """A sampling job whose draws all go through per-sequence generators (runtime/row_rng.py)."""
        return self.random and family_name is not None and self.depth == 0 and not self.constraints and \
            family(family_name).batches_sampling(self.params, self.plan)

    def post(self, kind: str, payload) -> None:
        if kind in ("done", "error"):
            self.finished = True
        self.sink(self, kind, payload)


@dataclass(eq=False)
class Cohort:
    jobs: list[Job]
    session: DecodeSession
    prompt_length: int  # padded
    rng: dict | None  # the cohort's random state (sampling cohorts only)
    t_start: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    rows_seen: tuple[int, int] = (0, 0)

    @property
    def live(self) -> list[int]:
        return [r for r, j in enumerate(self.jobs) if not j.finished and not j.cancelled]


def _exit_step(session: DecodeSession, row: int) -> int | None:
    """+prophet: the 1-based step at which this row exited early, None if it decoded to the end."""
    e = int(session.seq["prophet.exit"][row])
    return e if e > 0 else None


def build_session(backend, family_name: str, ids: torch.Tensor, am: torch.Tensor, params: dict,
                  plan: DecodePlan, prefix_store=None, constraints: dict | None = None,
                  answer_start: int | None = None) -> DecodeSession:
    """The `DecodeSession` that the family's generation drives for this left-padded prompt batch, without
    running it. Prefix reuse is skipped where the family's schedule does not allow it (LLaDA's CFG).
    `constraints` and `answer_start` (in answer positions) are the cohort's, as its jobs share them."""
    fam = family(family_name)
    return fam.session(backend, ids, am, params, plan, prefix_store if fam.prefix_reuse(params) else None,
                       **span_options(ids.shape[1], constraints, answer_start))


class Scheduler:
    """Owns the backend through one worker thread. `submit` is called from the event loop; everything that
    touches torch runs on the worker."""

    def __init__(self, backend, tokenizer, family: str, *, max_positions: int | None, max_batch: int = 32,
                 max_queue: int = 256, max_cohorts: int = 8, metrics=None, tokenizer_lock=None, threads: int | None = None,
                 prefix_store=None, bicache=None):
        self.backend, self.tokenizer, self.family = backend, tokenizer, family
        self.prefix_store = prefix_store  # runtime/prefix.PrefixStore (the all-layer freeze), or None
        self.bicache = bicache  # serve/reuse.BiCacheServing, or None: jobs with a depth > 0 run under it
        self.max_positions = max_positions
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_cohorts = 1 if shares_cache(backend) else max_cohorts
        self.metrics = metrics
        self.tok_lock = tokenizer_lock or threading.Lock()
        self.threads = threads
        self.info = backend.info
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.info.eos_token_id
        self.cv = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Cohort] = []
        self.draining = False
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps_total = 0

    # ---- event-loop side -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dlmtrt-serve-worker", daemon=True)
            self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.cv:
            if self.draining or self.stopping:
                raise ShuttingDown()
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull()
            self.waiting.extend(jobs)
            self._gauges()
            self.cv.notify()

    def cancel(self, jobs: list[Job]) -> None:
        with self.cv:
            for j in jobs:
                if not j.finished:
                    j.cancelled = True
            self.cv.notify()

    @property
    def alive(self) -> bool:
        """The worker thread runs: started with the app, ended only by `stop` (a failing step is answered as an
        error and the loop goes on)."""
        return self.thread is not None and self.thread.is_alive()

    def drain(self) -> None:
        """Stop accepting; what was accepted still runs."""
        with self.cv:
            self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything accepted, then end the worker."""
        with self.cv:
            self.draining = self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_requests(self) -> int:
        return sum(len(c.live) for c in self.running)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running_requests.set(sum(len(c.live) for c in self.running))
            self.metrics.running_cohorts.set(len(self.running))

    # ---- worker side -----------------------------------------------------------------------------------------
    def _take_groups(self) -> list[list[Job]]:
        """Under the lock: drop cancelled waiting jobs, and take the groups that become new cohorts."""
        for j in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(j)
            j.finished = True
        groups: dict[tuple, list[Job]] = {}
        free = self.max_cohorts - len(self.running)
        for j in self.waiting:
            k = j.key(self.max_positions, self.family)
            if k in groups:
                if len(groups[k]) < self.max_batch:
                    groups[k].append(j)
            elif len(groups) < free:
                groups[k] = [j]
        taken = [j for g in groups.values() for j in g]
        if taken:
            ids = {id(j) for j in taken}
            self.waiting = collections.deque(j for j in self.waiting if id(j) not in ids)
        return list(groups.values())

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                try:
                    if self._iteration():
                        return
                except Exception:  # a bug outside any one cohort: log it and keep serving
                    log.error("the scheduler loop failed:\n%s", traceback.format_exc())
                    time.sleep(0.1)

    def _iteration(self) -> bool:
        """One round: start the new cohorts, step every running one; True when the worker should end."""
        with self.cv:
            groups = self._take_groups()
            if not groups and not self.running:
                self._gauges()
                if self.stopping and not self.waiting:
                    return True
                self.cv.wait(0.5)
                return False
        for g in groups:
            self._start_cohort(g)
        for cohort in list(self.running):
            self._advance(cohort)
            with self.cv:  # a step boundary: whoever arrived meanwhile starts now
                groups = self._take_groups()
            for g in groups:
                self._start_cohort(g)
        with self.cv:
            self._gauges()
        return False

    def _start_cohort(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        try:
            P = max(len(j.ids) for j in jobs)  # as generate_text pads a batch: to its longest prompt
            dev = self.info.device
            ids = torch.full((len(jobs), P), self.pad_id, dtype=torch.long)
            am = torch.zeros((len(jobs), P), dtype=torch.long)
            for r, j in enumerate(jobs):
                ids[r, P - len(j.ids):] = torch.tensor(j.ids, dtype=torch.long)
                am[r, P - len(j.ids):] = 1
            rng = None
            if jobs[0].row_random(self.family):
                for j in jobs:
                    j.gen = torch.Generator(device=dev).manual_seed(j.seed)
            elif jobs[0].random:
                rng = {"cpu": torch.Generator().manual_seed(jobs[0].seed).get_state()}
                if torch.device(dev).type == "cuda":
                    g = torch.Generator(device=dev)
                    g.manual_seed(jobs[0].seed)
                    rng["cuda"] = g.get_state()
            if jobs[0].depth > 0:
                session = self._bicache_session(jobs, ids.to(dev), am.to(dev))
            else:
                store = self.prefix_store
                looked_up = store.stats.prompt_rows if store is not None else 0
                session = build_session(self.backend, self.family, ids.to(dev), am.to(dev), jobs[0].params,
                                        jobs[0].plan, store, jobs[0].constraints, jobs[0].answer_start)
                if store is not None and self.metrics is not None:
                    self.metrics.prefix_rows.inc(session.stats.prefix_rows)
                    self.metrics.prefix_prompt_rows.inc(store.stats.prompt_rows - looked_up)
                if self.bicache is not None and self.metrics is not None:
                    self.metrics.bicache_requests.labels("0").inc(len(jobs))
        except DlmtrtError as e:
            for j in jobs:
                j.post("error", (400, str(e)))
            return
        except Exception as e:  # a bug: answer it as one, keep serving
            log.error("building a cohort failed:\n%s", traceback.format_exc())
            for j in jobs:
                j.post("error", (500, f"internal error: {type(e).__name__}: {e}"))
            return
        for j in jobs:
            j.t_start = now
        cohort = Cohort(jobs, session, P, rng)
        self.running.append(cohort)
        if self.metrics is not None:
            self.metrics.cohort_size.observe(len(jobs))
            for j in jobs:
                self.metrics.queue_wait.observe(now - j.t_submit)

    def _bicache_session(self, jobs: list[Job], ids: torch.Tensor, am: torch.Tensor) -> DecodeSession:
        """The cohort's session under one BiCache generation over the shared store; the store's counters go to
        the metrics."""
        store = self.bicache.store
        before = (store.stats.hits, store.stats.misses, store.stats.evictions)
        session = build_session(self.backend, self.family, ids, am, jobs[0].params, jobs[0].plan,
                                self.bicache.for_cohort([j.prefix_len for j in jobs]), jobs[0].constraints,
                                jobs[0].answer_start)
        m = self.metrics
        if m is not None:
            m.bicache_hits.inc(store.stats.hits - before[0])
            m.bicache_misses.inc(store.stats.misses - before[1])
            m.bicache_evictions.inc(store.stats.evictions - before[2])
            m.bicache_tokens.set(store.tokens)
            m.bicache_prefixes.set(len(store.entries))
            m.prefix_rows.inc(session.stats.prefix_rows)
            m.bicache_requests.labels(str(session.prefix_store.depth)).inc(len(jobs))
        return session

    def _drop(self, cohort: Cohort) -> None:
        self.running.remove(cohort)
        if self.metrics is not None:
            self.metrics.cohorts_finished.inc()

    def _advance(self, cohort: Cohort) -> None:
        live = cohort.live
        if not live:  # everyone has been answered or has gone away
            self._drop(cohort)
            return
        s = cohort.session
        try:
            if not s.done:
                dev = self.info.device
                if cohort.rng is not None:
                    torch.set_rng_state(cohort.rng["cpu"])
                    if "cuda" in cohort.rng:
                        torch.cuda.set_rng_state(cohort.rng["cuda"], dev)
                with row_rng.row_generators([j.gen for j in cohort.jobs] if cohort.jobs[0].gen is not None
                                            else None):
                    s.step()
                if s.i == 1 and self.prefix_store is not None and s.prefix_store is self.prefix_store \
                        and self.metrics is not None:  # step 0 stored its prompts
                    self.metrics.prefix_bytes.set(s.prefix_store.bytes)
                    self.metrics.prefix_blocks.set(len(s.prefix_store))
                if cohort.rng is not None:
                    cohort.rng["cpu"] = torch.get_rng_state()
                    if "cuda" in cohort.rng:
                        cohort.rng["cuda"] = torch.cuda.get_rng_state(dev)
            self._account(cohort)
            self._publish(cohort, live, final=s.done)
        except Exception as e:
            log.error("a denoising step failed:\n%s", traceback.format_exc())
            status = 400 if isinstance(e, DlmtrtError) else 500
            for r in live:
                cohort.jobs[r].post("error", (status, f"generation failed: {type(e).__name__}: {e}"))
            self._drop(cohort)
            return
        live = cohort.live
        if s.done or not live:
            self._drop(cohort)
        elif len(live) < len(cohort.jobs) and not shares_cache(self.backend):
            s.keep(live)  # answered and abandoned rows leave the batch: later steps compute nothing for them
            cohort.jobs = [cohort.jobs[r] for r in live]

    def _account(self, cohort: Cohort) -> None:
        st = cohort.session.stats
        if st.steps > cohort.steps_done:
            self.steps_total += st.steps - cohort.steps_done
            if self.metrics is not None:
                self.metrics.steps.inc(st.steps - cohort.steps_done)
                self.metrics.rows_computed.inc(st.rows_computed - cohort.rows_seen[0])
                self.metrics.rows_full.inc(st.rows_full - cohort.rows_seen[1])
            cohort.steps_done = st.steps
            cohort.rows_seen = (st.rows_computed, st.rows_full)

    def _decode(self, tokens: list[int]) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _publish(self, cohort: Cohort, live: list[int], final: bool) -> None:
        """After a step: stream the newly committed prefixes, answer the rows whose answer is final."""
        s, P = cohort.session, cohort.prompt_length
        mask_id = self.info.mask_token_id
        stops = self.info.stop_ids or (self.info.eos_token_id,)
        answers = s.x[live, P:].tolist()
        for r, toks in zip(live, answers):
            job = cohort.jobs[r]
            first_mask = toks.index(mask_id) if mask_id in toks else len(toks)
            first_eos = answer_end(toks[:first_mask], stops)
            first_eos = first_eos if first_eos < first_mask else None
            done = final or first_eos is not None or first_mask == len(toks)
            if job.canvas:
                prompt = job.ids
                job.post("canvas", {"index": job.index, "step": s.i, "prompt_tokens": len(prompt),
                                    "canvas": prompt + [None if t == mask_id else t for t in toks]})
            if done:
                end = answer_end(toks, stops)  # as runtime.generate.decode_answer
                text = self._decode(toks[:end])
                if job.stream and text.startswith(job.emitted) and len(text) > len(job.emitted):
                    job.post("delta", text[len(job.emitted):])
                    job.emitted = text
                now = time.perf_counter()
                st = s.stats
                job.post("done", {
                    "text": text, "finish_reason": "stop" if end < len(toks) else "length",
                    "completion_tokens": end, "prompt_tokens": len(job.ids),
                    "dlmtrt": {"cohort_batch": len(cohort.jobs), "cohort_steps": st.steps,
                               "answered_at_step": s.i, "rows_computed": st.rows_computed,
                               "rows_full": st.rows_full, "queue_s": round(job.t_start - job.t_submit, 6),
                               "latency_s": round(now - job.t_submit, 6), "seed": job.seed,
                               "policy": job.plan.spec, "params": job.params,
                               **({"bicache_depth": job.depth, "prefix_rows": st.prefix_rows}
                                  if self.bicache is not None else {}),
                               **({"exit_step": _exit_step(s, r)} if job.plan.prophet is not None else {})}})
                if self.metrics is not None:
                    self.metrics.tokens.inc(end)
                    self.metrics.latency.observe(now - job.t_submit)
            elif job.stream:
                prefix = first_mask if first_eos is None else first_eos
                if prefix > job.last_prefix:
                    job.last_prefix = prefix
                    text = self._decode(toks[:prefix])
                    # hold back an incomplete UTF-8 sequence; never re-send what was sent
                    if text.startswith(job.emitted) and not text.endswith("\ufffd") and len(text) > len(job.emitted):
                        job.post("delta", text[len(job.emitted):])
                        job.emitted = text
