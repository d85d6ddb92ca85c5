"""`dlmtrt serve` / `dlmtrt serve-trt`: the OpenAI-compatible server (dlmtrt/serve)."""
from __future__ import annotations

import click

from dlmtrt.runtime.backends import BACKENDS

from ._common import NONEMPTY_TEXT, TEXT, check_device, dtype_choice, friendly_errors, positive


def _model_options(fn):
    """serve's own: a checkpoint or export chooses its device and (checkpoints) dtype."""
    fn = click.option("--dtype", type=dtype_choice(), default=None,
                      help="float32, float16 or bfloat16 [default: float32; exported graphs: their dtype].")(fn)
    return click.option("--device", default=None, callback=check_device,
                        help="cpu, cuda, cuda:N or auto [default: cpu; tensorrt: cuda].")(fn)


def _engine_options(fn):
    """serve-trt's: an engine runs on a GPU in the dtype it was built with."""
    return click.option("--device", default="cuda", show_default=True, callback=check_device,
                        help="The GPU the engine runs on: cuda or cuda:N.")(fn)


def _options(fn):
    for opt in reversed([
        click.option("--policy", default=None, metavar="SPEC", type=TEXT,
                     help="Default cache policy of requests that name none (as `dlmtrt generate --policy`) [default: "
                          "the family's: none; SDAR append, its exact cache]."),
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
                     help="Port (0 = any free port; the URL is printed)."),
        click.option("--max-batch", type=positive(4096), default=32, show_default=True,
                     help="Most requests in one cohort (one DecodeSession)."),
        click.option("--max-cohorts", type=positive(1024), default=8, show_default=True,
                     help="Most cohorts stepped round-robin at once (torch-graph and tensorrt: always 1)."),
        click.option("--max-queue", type=click.IntRange(0, 1_000_000), default=256, show_default=True,
                     help="Most accepted requests waiting for a cohort; beyond it requests get 429."),
        click.option("--max-tokens-limit", type=positive(), default=None,
                     help="Largest max_tokens a request may ask for [default: the model's positions - 1]."),
        click.option("--max-steps-limit", type=positive(), default=1024, show_default=True,
                     help="Largest steps a request may ask for (its default included: Dream's is 512)."),
        click.option("--prefix-cache-mb", type=click.IntRange(0, 1 << 20), default=None,
                     help="Cross-request prefix reuse, MiB kept on the device (0 = off). Block-causal families "
                          "(SDAR): the exact all-layer freeze of prompt-prefix K/V. Dream, LLaDA: BiCache, whose "
                          "store holds N MiB / (bytes of one prefix token: every layer's K and V plus L+1 hidden "
                          "states at the serving dtype) tokens of chats' shared turns, with the model's profiled "
                          f"depth table [default: {BLOCK_CAUSAL_PREFIX_MB} for block-causal families, 0 for the "
                          "others: docs/serving.md]."),
        click.option("--prefix-cache-mode", type=click.Choice(["bicache", "freeze"]), default=None,
                     help="bicache: BiCache (Dream, LLaDA only). freeze: the all-layer freeze, exact for block-causal "
                          "families and lossy for bidirectional ones, where it must be asked for [default: freeze "
                          "for block-causal families, bicache for the others]."),
        click.option("--max-choices", type=positive(1024), default=16, show_default=True,
                     help="Largest `n` (choices per prompt) a request may ask for."),
        click.option("--api-key", default=None, envvar="DLMTRT_API_KEY", type=NONEMPTY_TEXT,
                     help="Require `Authorization: Bearer KEY` on /v1/ (what the openai client sends as api_key); "
                          "others get 401. /health, /ready and /metrics stay open [env: DLMTRT_API_KEY]."),
        click.option("--access-log", type=click.Choice(["off", "json"]), default="off", show_default=True,
                     help="json: one JSON line per request on stderr (time, request_id, method, path, status, "
                          "duration_ms, client, token usage)."),
        click.option("--served-model-name", default=None, type=TEXT, help="Model id in the API [default: the --model/--engine "
                                                               "value]."),
        click.option("--threads", type=positive(1024), default=None,
                     help="torch CPU threads of the worker [default: torch's]."),
        click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
                     default="warning", show_default=True, help="uvicorn's log level (per-request lines: --access-log)."),
    ]):
        fn = opt(fn)
    return fn


BLOCK_CAUSAL_PREFIX_MB = 256


def prefix_cache_bytes(mb: int | None, family: str) -> int:
    """--prefix-cache-mb, or its default: on for block-causal families (exact there), off for the others."""
    if mb is not None:
        return mb << 20
    from dlmtrt.runtime.families import get
    return (BLOCK_CAUSAL_PREFIX_MB << 20) if get(family).block_causal else 0


def _bicache_options(fn):
    """serve's own: BiCache runs on the torch backend only (serve-trt refuses it, naming why)."""
    fn = click.option("--bicache-interval", type=positive(1 << 20), default=None,
                      help="BiCache: recompute the shared prefix in the deep layers every this many steps, from the "
                           "first [default: 16, the authors' run script].")(fn)
    return click.option("--bicache-table", type=click.Path(dir_okay=False, exists=True), default=None,
                        help="BiCache's depth table (dlmtrt bicache-profile) [default: bicache.json in the model's "
                             "directory].")(fn)


def reuse_plan(model: str, backend: str, src, dtype: str | None, prefix_cache_mb: int | None,
               prefix_cache_mode: str | None, bicache_table, bicache_interval):
    """(plan, BiCache depth table or None): the prefix reuse the options ask for (serve/reuse.py), checked before
    the weights load: the table is read and the chat template must split where a chat's last user turn starts."""
    from dlmtrt.runtime.backends import backend_class
    from dlmtrt.runtime.families import get
    from dlmtrt.serve.reuse import plan_reuse
    plan = plan_reuse(family=src.family, block_causal=get(src.family).block_causal, backend=backend,
                      deep_rows=backend_class(backend).deep_rows, args=src.args,
                      dtype=dtype or src.dtype or "float32", model_dir=src.path, mb=prefix_cache_mb,
                      mode=prefix_cache_mode, table_file=bicache_table, interval=bicache_interval,
                      block_causal_mb=BLOCK_CAUSAL_PREFIX_MB)
    if plan.mode != "bicache":
        return plan, None
    from dlmtrt.errors import UsageError
    from dlmtrt.models.loading import load_tokenizer, open_checkpoint
    from dlmtrt.runtime.bicache import chat_prefix
    from dlmtrt.runtime.bicache_table import read_table
    try:
        chat_prefix(load_tokenizer(open_checkpoint(model)), [{"role": "system", "content": "a"},
                                                             {"role": "user", "content": "b"}])
    except UsageError as e:
        raise UsageError(f"--prefix-cache-mb (BiCache): {e}; serve without it") from None
    return plan, read_table(plan.table_path, src.args.num_layers)[0]


def run_server(model, backend, device, dtype, policy, host, port, max_batch, max_cohorts, max_queue, max_tokens_limit,
               max_steps_limit, prefix_cache_mb, prefix_cache_mode, served_model_name, threads, log_level,
               max_choices=16, api_key=None, access_log="off", bicache_table=None, bicache_interval=None):
    import time

    from dlmtrt.runtime.backends import describe_model, make_backend
    from dlmtrt.runtime.policies import parse_policy
    try:
        from dlmtrt.serve.app import ServeConfig, Served
        from dlmtrt.serve.server import bind, serve
    except ImportError as e:
        raise click.ClickException(f"dlmtrt serve needs the 'serve' extra ({e.name} is missing): "
                                   "pip install 'dlmtrt[serve]'") from None

    if device is None:
        device = "cuda" if backend == "tensorrt" else "cpu"
    src = describe_model(backend, model)  # a missing model is one line, before anything binds or loads
    if policy is not None:
        parse_policy(policy)
    if max_tokens_limit is not None and max_tokens_limit >= src.args.max_position_embeddings:
        raise click.BadParameter(f"{max_tokens_limit} does not fit the model's {src.args.max_position_embeddings} "
                                 "positions with any prompt", param_hint="--max-tokens-limit")
    reuse, table = reuse_plan(model, backend, src, dtype, prefix_cache_mb, prefix_cache_mode, bicache_table,
                              bicache_interval)
    if reuse.lossy:
        from dlmtrt.serve.reuse import LOSSY_FREEZE
        click.echo(f"dlmtrt serve: warning: --prefix-cache-mode freeze {LOSSY_FREEZE.format(family=src.family)}",
                   err=True)
    sock = bind(host, port)
    if threads:
        import torch
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    be, tok, src = make_backend(backend, model, dtype=dtype, device=device)
    cfg = ServeConfig(model_id=served_model_name or model, policy=policy, max_batch=max_batch, max_queue=max_queue,
                      max_cohorts=max_cohorts, max_tokens_limit=max_tokens_limit, max_steps_limit=max_steps_limit,
                      threads=threads, prefix_cache_bytes=reuse.freeze_bytes, bicache_tokens=reuse.bicache_tokens,
                      bicache_table=table, bicache_interval=reuse.interval, api_key=api_key,
                      access_log=access_log == "json", max_choices=max_choices)
    served = Served(be, tok, src, cfg)
    load_s = time.perf_counter() - t0

    def announce(url):
        cohorts = served.scheduler.max_cohorts
        click.echo(f"dlmtrt serve: {src.family} model '{cfg.model_id}' ({be.name}, {device}, {src.dtype}; loaded in "
                   f"{load_s:.1f} s) listening on {url}", nl=True)
        click.echo(f"  POST {url}/v1/completions  {url}/v1/chat/completions   GET {url}/v1/models  {url}/health  "
                   f"{url}/ready  {url}/metrics  {url}/docs" + ("   (/v1/ needs the API key)" if api_key else ""),
                   nl=True)
        click.echo(f"  cohorts of <= {max_batch} requests, <= {cohorts} running, queue <= {max_queue}; ctrl-C or "
                   "SIGTERM finishes the accepted requests, then exits", nl=True)
        click.echo(f"  {reuse.describe(src.family)}", nl=True)
        import sys
        sys.stdout.flush()

    serve(served, sock, log_level=log_level, announce=announce)


@click.command("serve")
@click.option("--model", "-m", required=True,
              help="Checkpoint directory, alias or cached repo id (torch, torch-graph); export directory "
                   "(onnxruntime); engine file (tensorrt).")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch",
              show_default=True, help="Step backend (torch-graph and tensorrt run one cohort at a time).")
@_model_options
@_options
@_bicache_options
@friendly_errors
def serve_cmd(model, backend, **kw):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    Requests join a running batch at the next denoising step and leave when their answer is final; see the
    README's 'Serving' section for the diffusion fields (steps, block_length, policy, ...)."""
    run_server(model, backend, **kw)


@click.command("serve-trt")
@click.option("--engine", "-e", required=True, help="TensorRT engine file (dlmtrt build-engine).")
@_engine_options
@_options
@friendly_errors
def serve_trt_cmd(engine, **kw):
    """`dlmtrt serve --backend tensorrt --model ENGINE`: serve a TensorRT engine (one cohort at a time) in the
    dtype it was built with."""
    run_server(engine, "tensorrt", dtype=None, **kw)
