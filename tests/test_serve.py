"""The OpenAI-compatible server as a client sees it: real `dlmtrt serve` subprocesses on the shipped tiny
checkpoints (torch backend, CPU, one thread), driven with httpx and the `openai` package. Every answer is
compared with `generate_text` for the same prompt, parameters and seed, run here in the test process."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Server:
    """`python cli.py serve ... --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, model: str, *args: str, tmp: Path):
        self.log = tmp / f"serve-{model}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "-m", model, "--port", "0",
                                      "--threads", "1", *args], stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True, cwd=ROOT)
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {k: float(v) for k, v in re.findall(r"^(dlmtrt_\S+) (\S+)$", text, re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    started: dict[str, Server] = {}

    def get(name: str) -> Server:
        if name not in started:
            model, *args = {"dream": ["tiny-dream-tasks", "--max-steps-limit", "512"],
                            "llada": ["tiny-llada-tasks"],
                            "small": ["tiny-dream-tasks", "--max-queue", "2", "--max-cohorts", "1", "--max-batch",
                                      "1"],
                            "fuzz": ["tiny-dream-tasks", "--max-tokens-limit", "16", "--max-steps-limit", "16"],
                            "prefix": ["tiny-dream-tasks", "--prefix-cache-mb", "64", "--prefix-cache-mode",
                                       "freeze"],
                            "secure": ["tiny-llada-tasks", "--api-key", "sekrit-key", "--access-log", "json",
                                       "--max-choices", "4"],
                            }[name]
            started[name] = Server(model, *args, tmp=tmp)
        return started[name]
    yield get
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def offline():
    """generate_text in this process, exactly as `dlmtrt generate` runs it: family_params, then the seed."""
    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params

    loaded = {}

    def answer(family: str, prompt: str, *, chat: bool = False, policy: str = "none", seed: int = 0, **explicit):
        if family not in loaded:
            loaded[family] = make_backend("torch", f"tiny-{family}-tasks")
        be, tok, src = loaded[family]
        params = family_params(family, src.path, **explicit)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the servers run
        try:
            torch.manual_seed(seed)
            res = generate_text(be, tok, [prompt], chat=chat, policy=policy,
                                max_positions=src.args.max_position_embeddings, **params)
        finally:
            torch.set_num_threads(threads)
        return res.texts[0]
    return answer


def _prompts(n: int, seed: int = 3) -> list[str]:
    from dlmtrt.evals.tasks import TASKS
    half = n // 2
    return [p.prompt for p in TASKS["sudoku4"].problems(half, seed)] + \
        [p.prompt for p in TASKS["countdown"].problems(n - half, seed)]


def _cases(family: str) -> list[dict]:
    """36 requests: shared-batch greedy ones of several shapes and policies, seeded sampling ones, chat."""
    ps = _prompts(24)
    if family == "dream":
        greedy = dict(temperature=0.0, alg="entropy", max_tokens=24, steps=12)
        cases = [dict(prompt=p, **greedy) for p in ps[:14]]
        cases += [dict(prompt=p, policy="decode", **greedy) for p in ps[14:20]]
        cases += [dict(prompt=p, block_length=8, **greedy) for p in ps[20:24]]
        cases += [dict(prompt=p, max_tokens=16, steps=8, seed=k) for k, p in enumerate(ps[:6])]  # samples
    else:
        greedy = dict(max_tokens=24, steps=12, block_length=8)  # LLaDA's defaults are greedy
        cases = [dict(prompt=p, **greedy) for p in ps[:14]]
        cases += [dict(prompt=p, policy="dual", **greedy) for p in ps[14:20]]
        cases += [dict(prompt=p, max_tokens=16, steps=8, block_length=16, cfg_scale=0.5) for p in ps[20:24]]
        cases += [dict(prompt=p, remasking="random", seed=k + 7, **greedy) for k, p in enumerate(ps[:6])]
    cases += [dict(prompt="What is 2+2?", chat=True, max_tokens=16, steps=8, **(
        dict(temperature=0.0, alg="maskgit_plus") if family == "dream" else {})) for _ in range(2)]
    return cases


def _expected(offline, family: str, case: dict) -> str:
    c = dict(case)
    prompt, chat, policy, seed = c.pop("prompt"), c.pop("chat", False), c.pop("policy", "none"), c.pop("seed", 0)
    c["max_new_tokens"] = c.pop("max_tokens")
    return offline(family, prompt, chat=chat, policy=policy, seed=seed, **c)


async def _ask(client: httpx.AsyncClient, oai, url: str, k: int, case: dict):
    c = dict(case)
    prompt, chat = c.pop("prompt"), c.pop("chat", False)
    if k % 2:  # half through the openai package, the diffusion fields as extra_body
        std = {f: c.pop(f) for f in ("max_tokens", "temperature", "seed") if f in c}
        if chat:
            r = await oai.chat.completions.create(model=oai.model_id, messages=[{"role": "user", "content": prompt}],
                                                  extra_body=c, **std)
            return r.choices[0].message.content
        r = await oai.completions.create(model=oai.model_id, prompt=prompt, extra_body=c, **std)
        return r.choices[0].text
    if chat:
        r = await client.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], **c})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    r = await client.post(url + "/v1/completions", json={"prompt": prompt, **c})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def _fire(url: str, model_id: str, cases: list[dict]) -> list[str]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
        oai.model_id = model_id
        try:
            return await asyncio.gather(*(_ask(client, oai, url, k, c) for k, c in enumerate(cases)))
        finally:
            await oai.close()


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_concurrent_requests_equal_offline_generation(servers, offline, family):
    srv = servers(family)
    cases = _cases(family)
    assert len(cases) >= 32
    before = srv.metrics()
    answers = asyncio.run(_fire(srv.url, f"tiny-{family}-tasks", cases))
    after = srv.metrics()
    expected = [_expected(offline, family, c) for c in cases]
    wrong = [(k, cases[k], a, e) for k, (a, e) in enumerate(zip(answers, expected)) if a != e]
    assert not wrong, wrong[:3]
    assert any(a.strip() for a in answers)
    # they were batched: fewer cohorts than requests, and everything accounted for
    cohorts = after["dlmtrt_cohort_size_count"] - before.get("dlmtrt_cohort_size_count", 0)
    assert cohorts < len(cases)
    assert after["dlmtrt_requests_total{endpoint=\"completions\",status=\"200\"}"] >= len(cases) - 2
    assert after["dlmtrt_steps_total"] > before.get("dlmtrt_steps_total", 0)
    assert after["dlmtrt_tokens_generated_total"] > 0
    assert 0 < after["dlmtrt_rows_computed_total"] <= after["dlmtrt_rows_full_total"]
    assert after["dlmtrt_request_latency_seconds_count"] >= len(cases)
    assert after["dlmtrt_queue_depth"] == 0


@pytest.mark.parametrize("family,extra", [("dream", {"steps": 12}),
                                          ("llada", {"steps": 16, "block_length": 8, "temperature": 2.0})])
def test_sampling_requests_share_cohorts_and_draw_as_alone(servers, offline, family, extra):
    """Sampling requests batch (each with its own generator, prompts padded as greedy batches pad them): fewer
    cohorts than requests, every answer that of `generate --seed` alone."""
    srv = servers(family)
    prompts = ["abc", "xyz", "hello there", "abc"] * 3
    cases = [{"prompt": p, "max_tokens": 16, "seed": 100 + k, **extra} for k, p in enumerate(prompts)]
    before = srv.metrics()
    answers = asyncio.run(_fire(srv.url, f"tiny-{family}-tasks", cases))
    after = srv.metrics()
    assert answers == [_expected(offline, family, c) for c in cases]
    assert len(set(answers)) > 3
    assert after["dlmtrt_cohort_size_count"] - before.get("dlmtrt_cohort_size_count", 0) < len(cases) / 2


def _sse_events(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((event, "\n".join(data)))
    return out


def test_streaming_deltas_equal_the_answer(servers, offline):
    srv = servers("dream")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    prompt = _prompts(2)[0]
    for extra in (dict(alg="entropy", steps=24, temperature=0.0), dict(steps=12, seed=5)):
        body = dict(extra)
        std = {k: body.pop(k) for k in ("temperature", "seed") if k in body}
        full = client.completions.create(model="tiny-dream-tasks", prompt=prompt, max_tokens=24, extra_body=body,
                                         **std).choices[0].text
        chunks = list(client.completions.create(model="tiny-dream-tasks", prompt=prompt, max_tokens=24, stream=True,
                                                extra_body=body, **std))
        assert "".join(c.choices[0].text for c in chunks) == full
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        c = dict(extra)
        assert full == offline("dream", prompt, max_new_tokens=24, **c)
    # chat streaming through the openai package
    msgs = [{"role": "user", "content": "hello"}]
    kw = dict(model="tiny-dream-tasks", messages=msgs, max_tokens=16, temperature=0.0,
              extra_body={"steps": 16, "alg": "maskgit_plus"})
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == full == offline("dream", "hello", chat=True, max_new_tokens=16, steps=16,
                                             temperature=0.0, alg="maskgit_plus")


def test_streaming_canvas_events(servers):
    srv = servers("llada")
    body = {"prompt": _prompts(2)[1], "max_tokens": 24, "steps": 24, "block_length": 8, "stream": True,
            "dlmtrt_canvas": True}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    canvases = [json.loads(d) for e, d in events if e == "dlmtrt"]
    chunks = [json.loads(d) for e, d in events[:-1] if e is None]
    assert canvases and chunks
    n_prompt = canvases[0]["prompt_tokens"]
    prev = None
    for c in canvases:  # committed tokens never change, masks only disappear
        assert len(c["canvas"]) == n_prompt + 24
        if prev is not None:
            assert all(p is None or p == q for p, q in zip(prev, c["canvas"]))
            assert c["step"] > prev_step
        prev, prev_step = c["canvas"], c["step"]
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    full = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "dlmtrt_canvas": False},
                      timeout=120).json()["choices"][0]["text"]
    assert text == full
    # deltas arrived as the prefix grew, never one token twice: each chunk's text is new
    assert sum(len(ch["choices"][0]["text"]) for ch in chunks) == len(full)


def _bad_bodies(family: str) -> list[tuple[str, bytes | dict]]:
    other = {"remasking": "random"} if family == "dream" else {"alg": "entropy"}
    P = "/v1/completions"
    C = "/v1/chat/completions"
    return [
        (P, b"\xff\xfe{\"prompt\": \"\xff\"}"), (P, b"{not json"), (P, b""), (P, b"[1, 2]"), (P, b"\"text\""),
        (P, {"prompt": 5}), (P, {"prompt": [1, 2, 3]}), (P, {"prompt": ""}), (P, {"prompt": []}), (P, {}),
        (P, {"prompt": "x", "steps": -1}), (P, {"prompt": "x", "steps": 0}), (P, {"prompt": "x", "steps": "5"}),
        (P, {"prompt": "x", "steps": 1.5}), (P, {"prompt": "x", "steps": True}), (P, {"prompt": "x", "steps": 10**30}),
        (P, {"prompt": "x", "max_tokens": 10**6}), (P, {"prompt": "x", "max_tokens": 512}),
        (P, {"prompt": "x", "max_tokens": 0}), (P, {"prompt": "x", "max_tokens": -3}),
        (P, {"prompt": "x" * 600, "max_tokens": 8, "steps": 8}), (P, {"prompt": "x", "temperature": -1}),
        (P, {"prompt": "x", "temperature": "hot"}), (P, {"prompt": "x", "policy": "bogus"}),
        (P, {"prompt": "x", "policy": "decode+nonsense"}), (P, {"prompt": "x", "policy": 3}),
        (P, {"prompt": "x", "seed": -1}), (P, {"prompt": "x", "seed": 2 ** 64}), (P, {"prompt": "x", "n": 0}),
        (P, {"prompt": "x", "n": 10 ** 6}),
        (P, {"prompt": "x", "stop": "\n"}), (P, {"prompt": "x", "stepz": 3}), (P, {"prompt": "x", "model": "gpt-4"}),
        (P, {"prompt": "x", **other}), (P, {"prompt": "x", "max_tokens": 24, "block_length": 7, "steps": 24}),
        (P, {"prompt": "x", "stream": "yes"}), (P, {"prompt": "x", "echo": True}),
        (P, {"prompt": "x", "top_p": 0}), (P, {"prompt": "x", "dlmtrt_canvas": 1}),
        (C, {"messages": []}), (C, {"messages": "hi"}), (C, {"messages": [{"role": "tool", "content": "x"}]}),
        (C, {"messages": [{"role": "user"}]}), (C, {"messages": [{"role": "user", "content": 3}]}),
        (C, {"messages": [{"role": "user", "content": "x"}], "steps": -2}),
        (C, {"messages": [{"role": "user", "content": "x" * 600}], "max_tokens": 8, "steps": 8}),
    ]


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_bad_bodies_are_4xx_with_openai_errors(servers, family):
    srv = servers(family)
    with httpx.Client(timeout=60) as client:
        for path, body in _bad_bodies(family):
            if isinstance(body, bytes):
                r = client.post(srv.url + path, content=body, headers={"content-type": "application/json"})
            else:
                r = client.post(srv.url + path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        # the mask token spelt out in a prompt
        tok = client.get(srv.url + "/v1/models").json()["data"][0]
        assert tok["dlmtrt"]["family"] == family
        r = client.get(srv.url + "/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = client.get(srv.url + "/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
    m = srv.metrics()
    assert m.get("dlmtrt_requests_total{endpoint=\"completions\",status=\"400\"}", 0) > 0


def test_the_mask_token_in_a_prompt_is_refused(servers):
    from tokenizers import Tokenizer
    ck = ROOT / "dlmtrt" / "checkpoints" / "tiny-dream-tasks"
    mask = Tokenizer.from_file(str(ck / "tokenizer.json")).id_to_token(json.loads((ck / "config.json").read_text())
                                                                      ["mask_token_id"])
    r = httpx.post(servers("dream").url + "/v1/completions", json={"prompt": f"a {mask} b", "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and "mask token" in r.json()["error"]["message"], r.text


def test_models_health_and_metrics(servers):
    srv = servers("dream")
    models = httpx.get(srv.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny-dream-tasks"
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    text = httpx.get(srv.url + "/metrics").text
    for name in ("dlmtrt_queue_depth", "dlmtrt_running_requests", "dlmtrt_steps_total", "dlmtrt_tokens_generated_total",
                 "dlmtrt_rows_computed_total", "dlmtrt_rows_full_total", "dlmtrt_request_latency_seconds_bucket"):
        assert name in text
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-dream-tasks"]


def test_client_disconnect_drops_the_request(servers):
    srv = servers("dream")
    body = {"prompt": "abc", "max_tokens": 256, "steps": 256, "stream": True, "dlmtrt_canvas": True}
    before = srv.metrics()
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one step seen; hang up
    # and a non-streamed one whose client gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 20
    while True:
        m = srv.metrics()
        if m["dlmtrt_running_requests"] == 0 and m["dlmtrt_running_cohorts"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    # 512 steps would take many seconds: both were dropped long before
    assert m["dlmtrt_steps_total"] - before.get("dlmtrt_steps_total", 0) < 2 * 512


def test_queue_full_is_429_and_shutdown_is_graceful(servers):
    srv = servers("small")  # one running request, two waiting
    body = {"prompt": "hello", "max_tokens": 32, "steps": 32, "temperature": 0.0, "alg": "entropy"}

    async def burst(n):
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json=body) for _ in range(n)))

    rs = asyncio.run(burst(12))
    codes = [r.status_code for r in rs]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    err = next(r for r in rs if r.status_code == 429).json()["error"]
    assert err["code"] == "queue_full" and "queue is full" in err["message"]
    texts = {r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}
    assert len(texts) == 1  # the same greedy answer whatever the queue did

    # graceful shutdown: accepted requests finish, then the process exits 0
    long = {**body, "max_tokens": 128, "steps": 128}
    results = {}

    async def accepted_then_term():
        async with httpx.AsyncClient(timeout=120) as c:
            # one request running before the two that wait: three at once could find the queue (2) full
            tasks = [asyncio.ensure_future(c.post(srv.url + "/v1/completions", json=long))]
            deadline = time.monotonic() + 20
            while not re.search(r"^dlmtrt_running_requests 1\.0$", (await c.get(srv.url + "/metrics")).text, re.M):
                await asyncio.sleep(0.02)
                assert time.monotonic() < deadline
            tasks += [asyncio.ensure_future(c.post(srv.url + "/v1/completions", json=long)) for _ in range(2)]
            while True:
                await asyncio.sleep(0.05)
                m = (await c.get(srv.url + "/metrics")).text
                if re.search(r"^dlmtrt_queue_depth 2\.0$", m, re.M) or all(t.done() for t in tasks):
                    break
                assert time.monotonic() < deadline
            srv.proc.send_signal(signal.SIGTERM)
            results["codes"] = [r.status_code for r in await asyncio.gather(*tasks)]

    asyncio.run(accepted_then_term())
    assert results["codes"] == [200, 200, 200]
    assert srv.proc.wait(60) == 0
    assert "shutting down" in srv.log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=5)


@pytest.mark.skipif(shutil.which("st", path=str(Path(sys.executable).parent)) is None,
                    reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error(servers, tmp_path):
    srv = servers("fuzz")
    st = str(Path(sys.executable).parent / "st")
    r = subprocess.run([st, "run", srv.url + "/openapi.json", "--checks", "not_a_server_error", "-n", "25",
                        "--max-time", "40", "--generation-database", "none", "--no-color", "--seed", "1",
                        "--workers", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    import socket

    from click.testing import CliRunner

    from dlmtrt.cli import main
    runner = CliRunner()
    r = runner.invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--max-batch" in r.output and "--max-queue" in r.output
    r = runner.invoke(main, ["serve-trt", "--help"])
    assert r.exit_code == 0 and "--engine" in r.output
    r = runner.invoke(main, ["serve", "-m", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(main, ["serve", "-m", "tiny-dream-tasks", "--policy", "bogus"])
    assert r.exit_code == 2 and "unknown cache policy" in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(main, ["serve", "-m", "tiny-dream-tasks", "--port", str(port)])
    assert r.exit_code == 1 and f"port {port}" in r.output and "in use" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_scheduler_rules():
    from dlmtrt.runtime.backends import backend_class, make_backend
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    from dlmtrt.runtime.families import get as family
    from dlmtrt.serve.scheduler import Scheduler, bucket_of
    be, tok, _ = make_backend("torch", "tiny-dream-tasks")
    graph = TorchGraphBackend(make_backend("torch", "tiny-dream-tasks")[0].model)
    for backend, cohorts in ((be, 8), (graph, 1)):  # the graph backend hands out one cache buffer again
        a, b = backend.new_cache(1, 8), backend.new_cache(1, 8)
        assert (a[0][0].data_ptr() == b[0][0].data_ptr()) == (cohorts == 1)
        assert Scheduler(backend, tok, "dream", max_positions=512, max_cohorts=8).max_cohorts == cohorts
    assert not backend_class("onnxruntime").shares_cache and backend_class("tensorrt").shares_cache
    assert [bucket_of(n, 500) for n in (1, 16, 17, 33, 300, 499)] == [16, 16, 24, 48, 384, 500]
    dream = dict(temperature=0.0, alg="entropy", alg_temp=None)
    assert not family("dream").draws_random(dream)
    assert family("dream").draws_random({**dream, "alg": "origin"}) and family("dream").draws_random({**dream, "temperature": 0.5})
    assert family("dream").draws_random({**dream, "alg_temp": 0.1})
    assert not family("llada").draws_random(dict(temperature=0.0, remasking="low_confidence"))
    assert family("llada").draws_random(dict(temperature=0.0, remasking="random"))


def test_prefix_cache_serves_a_repeated_prompt_exactly(servers, offline):
    """--prefix-cache-mode freeze (asked for on Dream, and said at startup to be lossy there): the second identical
    request starts from the first one's prompt K/V (exact under `pd`, which never recomputes prompt rows) and the
    metrics count the served rows and the store's bytes."""
    srv = servers("prefix")
    assert "--prefix-cache-mode freeze is lossy for dream models" in srv.log.read_text()
    prompt = "sudoku\n0120\n4231\n2000\n0040\n"
    body = {"prompt": prompt, "max_tokens": 16, "steps": 16, "temperature": 0, "alg": "entropy", "policy": "pd"}
    first = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    m1 = srv.metrics()
    second = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    m2 = srv.metrics()
    want = offline("dream", prompt, policy="pd", max_new_tokens=16, steps=16, temperature=0.0, alg="entropy")
    assert first == second == want
    assert m1["dlmtrt_prefix_store_bytes"] > 0 and m1["dlmtrt_prefix_rows_served_total"] == 0
    assert m2["dlmtrt_prefix_rows_served_total"] >= 16
    assert m2["dlmtrt_rows_computed_total"] - m1["dlmtrt_rows_computed_total"] < m1["dlmtrt_rows_computed_total"]


def test_constraints_and_prophet_through_the_server_equal_offline_generation(servers):
    """The `constraints` and `answer_start` extension fields and policy +prophet: the answers and exit steps of
    concurrent requests (batched into cohorts of equal constraints) equal generate_text's; bad ones are 400s."""
    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.constraints import parse_constraints
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params
    srv = servers("llada")
    be, tok, src = make_backend("torch", "tiny-llada-tasks")
    cases = [dict(prompt=p, max_tokens=24, steps=24, block_length=8, constraints=c, policy=pol, **extra)
             for p in _prompts(3, seed=9)
             for c, pol, extra in (("0:The|1:x", "none", {}), (["2:ab", "9:c"], "none+prophet:early=3,mid=2,late=1", {}),
                                   ({"4": "ok"}, "none+prophet:early=1e9,mid=1e9,late=0", {"answer_start": 8}))]

    async def fire():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=c) for c in cases))
    answers = asyncio.run(fire())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case, r in zip(cases, answers):
            assert r.status_code == 200, r.text
            c = dict(case)
            params = family_params("llada", src.path, max_new_tokens=c.pop("max_tokens"), steps=c.pop("steps"),
                                   block_length=c.pop("block_length"))
            pins = parse_constraints(c.pop("constraints"), tok, answer_tokens=24)
            torch.manual_seed(0)
            res = generate_text(be, tok, [c.pop("prompt")], policy=c.pop("policy"), constraints=pins,
                                answer_start=c.pop("answer_start", None), **params)
            body = r.json()
            assert body["choices"][0]["text"] == res.texts[0]
            info = body["dlmtrt"][0]
            if "prophet" in case["policy"]:
                want = res.stats.exit_steps[0]
                # answered at its exit, or earlier (the answer before its EOS was final): then no exit yet
                assert info["exit_step"] == want or (info["exit_step"] is None and
                                                     (want is None or info["answered_at_step"] < want)), (info, want)
            else:
                assert "exit_step" not in info
    finally:
        torch.set_num_threads(threads)
    assert any(r.json()["dlmtrt"][0].get("exit_step") for r in answers), [r.json()["dlmtrt"] for r in answers]
    bad = [({"constraints": "x:The"}, "constraints", "not an integer"),
           ({"constraints": "30:The"}, "constraints", "past the 24-token answer"),
           ({"policy": "none+prophet"}, "answer_start", "needs the answer's position"),
           ({"answer_start": 2}, "answer_start", "add +prophet"),
           ({"policy": "none+prophet", "answer_start": 24}, "answer_start", "outside the 24-token answer"),
           ({"constraints": 5}, None, "")]
    for extra, param, words in bad:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 24, "steps": 24, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert words in err["message"] and (param is None or err["param"] == param), err


def test_api_key_request_ids_and_json_access_log(servers, offline):
    srv = servers("secure")
    body = {"prompt": "hello", "max_tokens": 8, "steps": 8, "block_length": 8}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 401 and err["code"] == "invalid_api_key" and "no API key given" in err["message"]
    assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"].startswith("req-")
    wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.completions.create(model="tiny-llada-tasks", prompt="hello", max_tokens=8)
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapers carry no key
        assert httpx.get(srv.url + path).status_code == 200, path
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit-key", max_retries=0)
    got = client.completions.with_raw_response.create(model="tiny-llada-tasks", prompt="hello", max_tokens=8,
                                                      extra_body={"steps": 8, "block_length": 8},
                                                      extra_headers={"X-Request-ID": "trace-42/a"})
    assert got.headers["x-request-id"] == "trace-42/a"
    assert got.parse().choices[0].text == offline("llada", "hello", max_new_tokens=8, steps=8, block_length=8)
    auth = {"Authorization": "Bearer sekrit-key"}
    for bad in ("has space", "x" * 129, ""):
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={**auth, "X-Request-ID": bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id", bad
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                      headers={**auth, "X-Request-ID": "stream-7"}, timeout=60) as r:
        assert r.headers["x-request-id"] == "stream-7" and "[DONE]" in r.read().decode()
    deadline = time.monotonic() + 10
    while True:  # the streamed request is logged when its last byte has left
        lines = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        by_id = {x["request_id"]: x for x in lines}
        if "stream-7" in by_id or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    one = by_id["trace-42/a"]
    assert one["status"] == 200 and one["path"] == "/v1/completions" and one["method"] == "POST"
    assert one["prompt_tokens"] > 0 and one["completion_tokens"] == 8 and one["duration_ms"] > 0
    assert by_id["stream-7"]["status"] == 200 and by_id["stream-7"]["completion_tokens"] == 8
    assert sum(x["status"] == 401 for x in lines) >= 2 and sum(x["status"] == 400 for x in lines) >= 3


def test_n_choices_are_drawn_with_consecutive_seeds(servers, offline):
    srv = servers("dream")  # Dream samples at its default temperature 1
    prompts = ["abc", "hello there"]
    body = {"prompt": prompts, "max_tokens": 8, "steps": 8, "seed": 11, "n": 3}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    expected = [offline("dream", p, seed=11 + c, max_new_tokens=8, steps=8) for p in prompts for c in range(3)]
    assert [c["text"] for c in choices] == expected
    assert len(set(expected[:3])) > 1  # the seeds differ, so (here) do the draws
    assert [d["seed"] for d in r.json()["dlmtrt"]] == [11, 12, 13, 11, 12, 13]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    chat = client.chat.completions.create(model="tiny-dream-tasks", n=2, seed=4, max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}], extra_body={"steps": 8})
    assert [c.message.content for c in chat.choices] == \
        [offline("dream", "hi", chat=True, seed=4 + c, max_new_tokens=8, steps=8) for c in range(2)]
    # streamed, the choices' deltas interleave by index and add up to the same answers
    chunks = list(client.completions.create(model="tiny-dream-tasks", prompt=prompts[0], max_tokens=8, n=3,
                                            seed=11, stream=True, extra_body={"steps": 8}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k) for k in range(3)]
    assert streamed == expected[:3]
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    for n in (0, 17):
        r = httpx.post(srv.url + "/v1/completions", json={**body, "n": n}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_health_is_liveness_and_ready_is_readiness():
    """/health answers 200 while the process and its worker live (draining included); /ready only while the
    server takes requests: worker running, not draining, queue not full."""
    from types import SimpleNamespace

    from dlmtrt.serve.app import ServeConfig, _Routes

    sched = SimpleNamespace(alive=True, draining=False, queue_depth=0, running_requests=1)
    routes = _Routes(SimpleNamespace(scheduler=sched, metrics=None, config=ServeConfig(model_id="m", max_queue=2)))

    def both():
        h, r = asyncio.run(routes.health()), asyncio.run(routes.ready())
        return h.status_code, json.loads(h.body)["status"], r.status_code, json.loads(r.body)
    h, hs, r, rb = both()
    assert (h, hs, r, rb["status"], rb["reason"]) == (200, "ok", 200, "ready", None)
    sched.queue_depth = 2
    h, hs, r, rb = both()
    assert (h, r) == (200, 503) and "queue is full (2 waiting)" in rb["reason"]
    sched.queue_depth, sched.draining = 0, True
    h, hs, r, rb = both()
    assert (h, hs, r) == (200, "draining", 503) and rb["reason"].startswith("draining")
    sched.alive = False
    h, hs, r, rb = both()
    assert (h, hs, r) == (503, "dead", 503) and "worker is not running" in rb["reason"]
