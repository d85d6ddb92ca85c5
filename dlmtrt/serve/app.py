"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /ready, /metrics.

Every request is validated completely before it is queued (types, the family's parameters through
runtime/params.py, the policy through runtime/policies.py, lengths against the model and the server's limits),
so a bad request is a 4xx with OpenAI's error shape and never reaches the worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlmtrt import __version__
from dlmtrt.errors import DlmtrtError
from dlmtrt.runtime.families import get as family
from dlmtrt.runtime.params import SEED_LIMIT, check_step_budget
from dlmtrt.runtime.policies import parse_policy
from dlmtrt.runtime.prefix import BLOCK as PREFIX_BLOCK
from dlmtrt.runtime.prefix import PrefixStore

from .metrics import Metrics
from .middleware import RequestMiddleware
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, DiffusionFields
from .reuse import BiCacheServing
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

# request fields that are generation parameters, by their generic names (a family takes some: runtime/families/)
PARAM_FIELDS = ("steps", "temperature", "alg", "alg_temp", "eps", "top_p", "top_k", "block_length", "remasking",
                "confidence_threshold", "cfg_scale")


@dataclass
class ServeConfig:
    model_id: str
    policy: str | None = None  # requests that name none; None: the family's default (runtime/families)
    max_batch: int = 32
    max_queue: int = 256
    max_cohorts: int = 8
    max_tokens_limit: int | None = None  # default: the model's positions
    max_steps_limit: int = 1024
    threads: int | None = None
    prefix_cache_bytes: int = 0  # cross-request prefix K/V reuse, the all-layer freeze (runtime/prefix.py); 0 = off
    prefix_block: int = PREFIX_BLOCK
    bicache_tokens: int = 0  # BiCache's store (runtime/bicache.py, serve/reuse.py) in prefix tokens; 0 = off
    bicache_table: object = None  # its runtime/bicache.DepthTable
    bicache_interval: int = 16
    api_key: str | None = None  # /v1/ needs `Authorization: Bearer <key>` (serve/middleware.py)
    access_log: bool = False  # one JSON line per request on stderr
    max_choices: int = 16  # largest `n`


class Served:
    """The loaded model and everything the endpoints share."""

    def __init__(self, backend, tokenizer, source, config: ServeConfig):
        self.backend, self.tokenizer, self.source, self.config = backend, tokenizer, source, config
        self.family = source.family
        self.fam = family(source.family)
        self.max_positions = source.args.max_position_embeddings
        self.metrics = Metrics()
        self.tok_lock = threading.Lock()
        self.created = int(time.time())
        self.default_policy = config.policy or family(source.family).default_policy
        parse_policy(self.default_policy)  # a misspelt --policy fails at startup; combinations are checked per request
        self.bicache = None
        if config.bicache_tokens > 0:
            from dlmtrt.runtime.bicache import BiCacheStore
            self.bicache = BiCacheServing(BiCacheStore(config.bicache_tokens), config.bicache_table,
                                          config.bicache_interval, backend.info.num_layers)
        self.scheduler = Scheduler(backend, tokenizer, self.family, max_positions=self.max_positions,
                                   max_batch=config.max_batch, max_queue=config.max_queue,
                                   max_cohorts=config.max_cohorts, metrics=self.metrics,
                                   tokenizer_lock=self.tok_lock, threads=config.threads,
                                   prefix_store=PrefixStore(config.prefix_cache_bytes, config.prefix_block)
                                   if config.prefix_cache_bytes > 0 else None, bicache=self.bicache)

    # ---- validation --------------------------------------------------------------------------------------
    def params_of(self, req: DiffusionFields) -> tuple[dict, object, int]:
        fam = self.family
        for f, why in req.unsupported():
            raise ApiError(400, why, param=f, code="unsupported_parameter")
        if req.model is not None and req.model != self.config.model_id:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves "
                                f"'{self.config.model_id}' (GET /v1/models)", param="model", code="model_not_found")
        wrong = [f for f in PARAM_FIELDS if getattr(req, f) is not None and not self.fam.takes(f)]
        if wrong:
            raise ApiError(400, f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {fam} models",
                           param=wrong[0])
        max_tokens = getattr(req, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = req.max_tokens
        explicit = {f: getattr(req, f) for f in PARAM_FIELDS if getattr(req, f) is not None}
        if max_tokens is not None:
            explicit["max_new_tokens"] = max_tokens
        try:
            params = self.fam.resolve(self.source.path, **explicit)
            plan = parse_policy(req.policy if req.policy is not None else self.default_policy)
            plan.check(fam, params.get("remasking"))
            check_step_budget(fam, params, plan.parallel is not None, explicit_steps=req.steps is not None)
        except DlmtrtError as e:
            raise ApiError(400, str(e), param=_param_of(e)) from None
        new = self.fam.new_tokens(params)
        limit = self.config.max_tokens_limit
        if limit is not None and new > limit:
            raise ApiError(400, f"max_tokens {new} exceeds this server's limit of {limit}", param="max_tokens")
        if new >= self.max_positions:
            raise ApiError(400, f"max_tokens {new} does not fit the model's {self.max_positions} positions with any "
                                "prompt; ask for fewer", param="max_tokens")
        steps = params[self.fam.own("steps")]
        if steps > self.config.max_steps_limit:
            raise ApiError(400, f"steps {steps} exceeds this server's limit of "
                                f"{self.config.max_steps_limit}", param="steps")
        seed = 0 if req.seed is None else req.seed
        if not 0 <= seed < SEED_LIMIT:
            raise ApiError(400, f"seed must be in [0, 2**64), got {seed}", param="seed")
        n = req.choices
        if not 1 <= n <= self.config.max_choices:
            raise ApiError(400, f"n must be between 1 and this server's limit of {self.config.max_choices}, got {n}",
                           param="n")
        return params, plan, seed

    def tokenize(self, text: str, param: str) -> list[int]:
        if not text:
            raise ApiError(400, f"the {param} is empty", param=param)
        with self.tok_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._checked(ids, param)

    def _checked(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"the {param} has no tokens", param=param)
        if self.backend.info.mask_token_id in ids:
            raise ApiError(400, f"the {param} contains the mask token; remove it (the canvas uses it for unknown "
                                "positions)", param=param)
        return ids

    def _messages(self, req: ChatCompletionRequest) -> list[dict]:
        if not req.messages:
            raise ApiError(400, "messages is empty", param="messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]

    def chat_text(self, req: ChatCompletionRequest) -> str:
        msgs = self._messages(req)
        try:
            with self.tok_lock:
                return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:
            raise ApiError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], int]:
        """(ids, P) of a chat under BiCache: the authors' tokenization, P where the turns before the last user
        message end (0: no boundary, served without reuse). Messages the template renders but does not split
        there (the startup check split a plain chat) are served whole, without reuse: exact, only slower."""
        from dlmtrt.runtime.bicache import chat_prefix
        msgs = self._messages(req)
        try:
            with self.tok_lock:
                ids, P = chat_prefix(self.tokenizer, msgs)
        except DlmtrtError:
            return self.tokenize(self.chat_text(req), "messages"), 0
        except Exception as e:
            raise ApiError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        return self._checked(ids, "messages"), P

    def jobs_of(self, req: DiffusionFields, texts: list[str] | None, param: str, sink,
                prompts: list[tuple[list[int], int]] | None = None) -> list[Job]:
        """The request's jobs: one per text (tokenized here, no shared-prefix boundary) or per already tokenized
        (ids, prefix length) prompt (a chat under BiCache), each with the BiCache depth it runs at."""
        params, plan, seed = self.params_of(req)
        new = self.fam.new_tokens(params)
        pinned = self.constraints_of(req, plan, new)
        if prompts is None:
            prompts = [(self.tokenize(text, param), 0) for text in texts]
        reuse = self.bicache is not None and self.fam.prefix_reuse(params)
        n = req.choices
        jobs = []
        for k, (ids, P) in enumerate(prompts):
            if len(ids) + new > self.max_positions:
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({new}) exceeds the model's "
                                    f"{self.max_positions} positions; shorten the prompt or ask for fewer tokens",
                               param=param, code="context_length_exceeded")
            self._check_rule(params, plan, len(ids))
            depth = self.bicache.depth(P, len(ids), new) if reuse else 0
            for c in range(n):  # choice c of prompt k: index k * n + c, as OpenAI numbers them; seed + c
                jobs.append(Job(ids, params, plan, (seed + c) % SEED_LIMIT, self.fam.draws_random(params), new,
                                sink, stream=req.stream, canvas=req.dlmtrt_canvas, index=k * n + c, prefix_len=P,
                                depth=depth, constraints=pinned, answer_start=req.answer_start))
        return jobs

    def constraints_of(self, req: DiffusionFields, plan, new: int) -> dict[int, int] | None:
        """The request's constraints as {answer position: token id}, and +prophet's need of an answer span."""
        from dlmtrt.runtime.constraints import parse_constraints
        if req.answer_start is not None and not 0 <= req.answer_start < new:
            raise ApiError(400, f"answer_start {req.answer_start} is outside the {new}-token answer",
                           param="answer_start")
        if plan.prophet is not None and not req.constraints and req.answer_start is None:
            raise ApiError(400, "policy +prophet needs the answer's position: give constraints (its span starts 2 "
                                "after the last) or answer_start", param="answer_start")
        if plan.prophet is None and req.answer_start is not None:
            raise ApiError(400, "answer_start places +prophet's span; add +prophet to the policy or drop it",
                           param="answer_start")
        if not req.constraints:
            return None
        try:
            with self.tok_lock:
                return parse_constraints(req.constraints, self.tokenizer, answer_tokens=new)
        except DlmtrtError as e:
            raise ApiError(400, str(e), param="constraints") from None

    def _check_rule(self, params: dict, plan, prompt_length: int) -> None:
        """Build the rule once, so that whatever it refuses is a 400 now rather than an error mid-stream."""
        try:
            self.fam.check_rule(self.backend.info, params, prompt_length, plan)
        except DlmtrtError as e:
            raise ApiError(400, str(e), param=_param_of(e)) from None


def _param_of(e: Exception) -> str | None:
    """The request field a runtime error is about, as the client spells it (the error's `field`)."""
    field = getattr(e, "field", None)
    return {"max_new_tokens": "max_tokens", "gen_length": "max_tokens"}.get(field, field)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def create_app(served: Served) -> FastAPI:
    """The app serving `served`: OpenAI's error shape for every failure, the health, metrics and models routes,
    and the completion routes; the scheduler runs for the app's lifespan."""
    app = FastAPI(title="dlmtrt", version=__version__, lifespan=_lifespan,
                  description="OpenAI-compatible serving of diffusion language models (Dream, LLaDA). "
                              "Fields marked dlmtrt are extensions; see README 'Serving'.")
    app.state.served = served
    _add_error_handlers(app)
    _Routes(served).add_to(app)
    app.add_middleware(RequestMiddleware, api_key=served.config.api_key, access_log=served.config.access_log)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    sched = app.state.served.scheduler
    sched.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, sched.stop)


# ---- errors: every failure in OpenAI's error shape ----------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _bug)


async def _api_error(request: Request, e: ApiError):
    return _error(e)


async def _validation(request: Request, e: RequestValidationError):
    """A body FastAPI cannot parse or validate: one message for the first problem, naming its field."""
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if kind in ("json_invalid",) or not loc and kind != "missing":
        msg = f"the body is not valid JSON: {first.get('msg', 'parse error')}" if kind == "json_invalid" else \
            f"the body must be a JSON object: {first.get('msg', '')}"
        return _error(ApiError(400, msg, code="invalid_body"))
    where = ".".join(loc) or "body"
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = "unknown field (see GET /openapi.json for the fields this server takes)"
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    return _error(ApiError(400, f"{where}: {msg}{more}", param=loc[0] if loc else None, code="invalid_value"))


async def _http(request: Request, e: StarletteHTTPException):
    typ = "invalid_request_error" if e.status_code < 500 else "server_error"
    detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
    if e.status_code == 400:
        detail = f"the body cannot be read as JSON: {detail}"
    return _error(ApiError(e.status_code, detail, type=typ, headers=getattr(e, "headers", None)))


async def _bug(request: Request, e: Exception):
    return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))


# ---- routes -------------------------------------------------------------------------------------------------

class _Routes:
    """The route handlers over one `Served`. They have no docstrings: FastAPI would publish them in
    /openapi.json as the operations' descriptions."""

    def __init__(self, served: Served):
        self.served = served
        self.sched, self.metrics, self.cfg = served.scheduler, served.metrics, served.config

    def add_to(self, app: FastAPI) -> None:
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

    async def health(self):
        sched = self.sched
        alive = sched.alive
        state = "dead" if not alive else "draining" if sched.draining else "ok"
        return JSONResponse({"status": state, "model": self.cfg.model_id, "queue_depth": sched.queue_depth,
                             "running_requests": sched.running_requests}, status_code=200 if alive else 503)

    async def ready(self):
        sched = self.sched
        why = ("the worker is not running" if not sched.alive else "draining: the server is shutting down"
               if sched.draining else f"the queue is full ({self.cfg.max_queue} waiting)"
               if sched.queue_depth >= self.cfg.max_queue else None)
        return JSONResponse({"status": "ready" if why is None else "not_ready", "reason": why,
                             "model": self.cfg.model_id, "queue_depth": sched.queue_depth,
                             "running_requests": sched.running_requests}, status_code=200 if why is None else 503)

    async def prometheus(self):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def models(self):
        served, cfg = self.served, self.cfg
        src = served.source
        return {"object": "list", "data": [{
            "id": cfg.model_id, "object": "model", "created": served.created, "owned_by": "dlmtrt",
            "dlmtrt": {"family": served.family, "backend": served.backend.name, "dtype": src.dtype,
                       "max_positions": served.max_positions, "policy": served.default_policy,
                       "max_tokens_limit": cfg.max_tokens_limit, "max_steps_limit": cfg.max_steps_limit,
                       "max_batch": cfg.max_batch, "max_queue": cfg.max_queue, "max_choices": cfg.max_choices,
                       "path": str(Path(src.path))}}]}

    async def completions(self, body: CompletionRequest, request: Request):
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not texts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        return await self._generate(request, body, texts, "prompt", chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self._generate(request, body, None, "messages", chat=True)

    # ---- completions, both endpoints
    async def _generate(self, request: Request, body: DiffusionFields, texts, param: str, chat: bool):
        """Queue one job per prompt, then stream their events or wait for all of them (a 499 when the client
        goes away first)."""
        endpoint = "chat" if chat else "completions"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(job, kind, payload):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, (job.index, kind, payload))

        jobs = self._submit(body, texts, param, chat, sink, endpoint)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": self.cfg.model_id}
        if body.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(self._stream(body, jobs, queue, head, chat, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self._results(request, jobs, queue, endpoint)
        if results is None:
            return Response(status_code=499)  # nobody reads it
        self.metrics.requests.labels(endpoint, "200").inc()
        out = _completion(head, results, chat)
        request.state.usage = {"id": rid, "choices": len(results), **out["usage"]}
        return out

    def _submit(self, body: DiffusionFields, texts, param: str, chat: bool, sink, endpoint: str) -> list[Job]:
        """The request's jobs, validated and queued; a refusal is counted in the metrics under its status."""
        served = self.served
        try:
            prompts = None
            if chat and served.bicache is not None:
                prompts = [served.chat_prompt(body)]
            elif chat:
                texts = [served.chat_text(body)]
            jobs = served.jobs_of(body, texts, param, sink, prompts)
            try:
                self.sched.submit(jobs)
            except QueueFull:
                raise ApiError(429, f"the queue is full ({self.cfg.max_queue} requests waiting); retry later",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
            except ShuttingDown:
                raise ApiError(503, "the server is shutting down and accepts no new requests",
                               type="server_error", code="shutting_down") from None
        except ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        return jobs

    async def _results(self, request: Request, jobs: list[Job], queue: asyncio.Queue,
                       endpoint: str) -> list[dict] | None:
        """Every job's result, in prompt order; None when the client went away first. The jobs are cancelled
        whichever way this ends, so none keeps the worker busy for nobody."""
        results: list[dict | None] = [None] * len(jobs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while any(r is None for r in results):
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.metrics.requests.labels(endpoint, "499").inc()
                    return None
                idx, kind, payload = get.result()
                if kind == "done":
                    results[idx] = payload
                elif kind == "error":
                    status, msg = payload
                    self.metrics.requests.labels(endpoint, str(status)).inc()
                    raise ApiError(status, msg, type="server_error" if status >= 500 else "invalid_request_error")
        finally:
            gone.cancel()
            self.sched.cancel(jobs)
        return results

    async def _stream(self, body: DiffusionFields, jobs: list[Job], queue: asyncio.Queue, head: dict, chat: bool,
                      request: Request):
        """Server-sent events: the jobs' deltas, canvases (`event: dlmtrt`) and final chunks as they come, the
        usage when asked for, then [DONE]; the first error ends the stream."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        left = len(jobs)
        usage = [0, 0]
        try:
            if chat:
                for j in jobs:
                    yield _sse(_chunk(head, obj, chat, j.index, "", None, first=True))
            while left:
                idx, kind, payload = await queue.get()
                if kind == "delta":
                    yield _sse(_chunk(head, obj, chat, idx, payload, None))
                elif kind == "canvas":
                    yield _sse(payload, event="dlmtrt")
                elif kind == "done":
                    left -= 1
                    usage[0] += payload["prompt_tokens"]
                    usage[1] += payload["completion_tokens"]
                    final = _chunk(head, obj, chat, idx, None if chat else "", payload["finish_reason"])
                    final["dlmtrt"] = payload["dlmtrt"]
                    yield _sse(final)
                elif kind == "error":
                    status, msg = payload
                    yield _sse(ApiError(status, msg, type="server_error" if status >= 500 else
                                        "invalid_request_error").body())
                    break
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({**head, "object": obj, "choices": [],
                            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                      "total_tokens": usage[0] + usage[1]}})
            request.state.usage = {"id": head["id"], "choices": len(jobs), "prompt_tokens": usage[0],
                                   "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1]}
            yield "data: [DONE]\n\n"
        finally:
            self.sched.cancel(jobs)


def _completion(head: dict, results: list[dict], chat: bool) -> dict:
    """The body of a finished (not streamed) completion: one choice per prompt, the summed usage."""
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    completion_tokens = sum(r["completion_tokens"] for r in results)
    if chat:
        choices = [{"index": k, "message": {"role": "assistant", "content": r["text"]},
                    "finish_reason": r["finish_reason"], "logprobs": None} for k, r in enumerate(results)]
    else:
        choices = [{"index": k, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                   for k, r in enumerate(results)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "dlmtrt": [r["dlmtrt"] for r in results]}


def _chunk(head: dict, obj: str, chat: bool, index: int, text: str | None, finish: str | None,
           first: bool = False) -> dict:
    """One streamed chunk of choice `index`: a chat delta (the first one carries the role) or a text piece."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else \
            ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {**head, "object": obj, "choices": [choice]}
