"""BiCache in the server and the profile command: chats served in-process (FastAPI's test client, the scheduler's
worker thread) on the BiCache fixture checkpoint give exactly the tokens of a direct BiCache generation with the
same table and interval; the store is shared across requests; different depths never share a cohort; requests
without a boundary run without reuse; the options refuse what cannot be served, before any weights load; and
`dlmtrt bicache-profile` writes a table the server reads."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dlmtrt.cli import main
from dlmtrt.runtime.bicache import BiCache, BiCacheStore, DepthTable, chat_prefix, prefix_ratio
from dlmtrt.runtime.bicache_table import read_table, write_table
from dlmtrt.runtime.generate import answer_end, llada_generate

pytest.importorskip("fastapi")

FIX = Path(__file__).resolve().parent / "fixtures" / "upstream" / "bicache"
CKPT = FIX / "ckpt-llada-bicache"
TABLE = {"0": 1, "30": 2, "60": 3}  # the fixture's T1 on its 4-layer model
TOKENS = 4096
INTERVAL = 2  # a refresh every other step: between refreshes the deep layers read the last refresh's prefix K/V
GEN = dict(max_tokens=8, steps=8)
SYSTEM = "You are a careful assistant that answers briefly and cites the rule it used."


def chat(*turns: str, system: str = SYSTEM) -> list[dict]:
    """A system prompt and alternating user / assistant turns, the last one a user turn."""
    roles = ["user", "assistant"]
    return [{"role": "system", "content": system}] + [{"role": roles[k % 2], "content": t}
                                                      for k, t in enumerate(turns)]


@pytest.fixture(scope="module")
def model():
    from dlmtrt.runtime.backends import make_backend
    torch.set_num_threads(1)
    return make_backend("torch", str(CKPT))


def _served(model, table_doc: dict | None = None):
    from dlmtrt.serve.app import ServeConfig, Served
    be, tok, src = model
    table = DepthTable.of(table_doc or TABLE)
    return Served(be, tok, src, ServeConfig(model_id="fix", bicache_tokens=TOKENS, bicache_table=table,
                                            bicache_interval=INTERVAL))


@pytest.fixture()
def client(model):
    from fastapi.testclient import TestClient

    from dlmtrt.serve.app import create_app
    served = _served(model)
    with TestClient(create_app(served)) as c:
        c.served = served
        yield c


def direct(model, ids: list[int], P: int | None, table=TABLE) -> tuple[str, object]:
    """(text, statistics) of the runtime's own generation: BiCache over a fresh store when P is given, else none."""
    be, tok, _ = model
    store = None if P is None else BiCache(BiCacheStore(TOKENS), DepthTable.of(table), [P], INTERVAL)
    x, st = llada_generate(be, torch.tensor([ids]), gen_length=8, steps=8, block_length=8, prefix_store=store)
    toks = x[0, len(ids):].tolist()
    return tok.decode(toks[:answer_end(toks, be.info.stop_ids)], skip_special_tokens=True), st


def ask(client, messages: list[dict]) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": messages, **GEN})
    assert r.status_code == 200, r.text
    return r.json()


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_chats_sharing_turns_are_the_runtime_bicache_generation_and_hit_the_store(client, model):
    tok = model[1]
    first = chat("Name three rivers in Europe.", "The Danube, the Rhine and the Loire.", "Which is the longest?")
    second = first[:-1] + [{"role": "user", "content": "Which one flows through Vienna, and which through Paris?"}]
    got = []
    for k, msgs in enumerate((first, second)):
        body = ask(client, msgs)
        ids, P = chat_prefix(tok, msgs)
        want, st = direct(model, ids, P)
        info = body["dlmtrt"][0]
        assert body["choices"][0]["message"]["content"] == want
        assert info["rows_computed"] == st.rows_computed and info["prefix_rows"] == P
        depth = DepthTable.of(TABLE).depth(prefix_ratio(P, len(ids) + 8), 4)
        assert info["bicache_depth"] == depth and 0 < depth < 4  # shallow layers reused, the deep one recomputed
        assert (metric(client, "dlmtrt_bicache_hits_total"), metric(client, "dlmtrt_bicache_misses_total")) == (k, 1)
        got.append(st.rows_computed)
    plain = direct(model, ids, None)[1]
    assert got[1] < plain.rows_computed  # the shared prefix was not recomputed at every step
    assert metric(client, "dlmtrt_bicache_store_tokens") == P and metric(client, "dlmtrt_bicache_store_prefixes") == 1
    assert sum(metric(client, f'dlmtrt_bicache_requests_total{{depth="{d}"}}') for d in (1, 2, 3)) == 2


def test_requests_without_a_boundary_run_without_reuse(client, model):
    be, tok, _ = model
    prompt = "Name three rivers in Europe."
    body = client.post("/v1/completions", json={"prompt": prompt, **GEN}).json()
    want, _ = direct(model, tok(prompt, add_special_tokens=False)["input_ids"], None)
    assert body["choices"][0]["text"] == want and body["dlmtrt"][0]["bicache_depth"] == 0
    lone = [{"role": "user", "content": prompt}]
    body = ask(client, lone)
    ids, P = chat_prefix(tok, lone)
    assert P == 0 and body["choices"][0]["message"]["content"] == direct(model, ids, None)[0]
    assert metric(client, "dlmtrt_bicache_misses_total") == 0
    assert metric(client, 'dlmtrt_bicache_requests_total{depth="0"}') == 2


def test_a_chat_the_template_does_not_split_is_served_whole(model):
    import copy
    be, tok, src = model
    tok = copy.deepcopy(tok)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    served = _served((be, tok, src))
    ids, P = served.chat_prompt(_request(chat("a", "b", "c")))
    assert P == 0 and ids == tok(f"4{SYSTEM}abc", add_special_tokens=False)["input_ids"]


def test_dream_chats_run_under_bicache_with_the_shipped_table():
    """Dream (its Qwen template, split where the earlier turns' own template ends) through the server as the
    runtime's BiCache generation, at the depth the shipped tiny model's table gives."""
    from fastapi.testclient import TestClient

    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.bicache_table import TABLE_FILE
    from dlmtrt.runtime.families import get
    from dlmtrt.serve.app import ServeConfig, Served, create_app
    be, tok, src = make_backend("torch", "tiny-dream-tasks")
    table, _ = read_table(Path(src.path) / TABLE_FILE, 6)
    served = Served(be, tok, src, ServeConfig(model_id="d", bicache_tokens=TOKENS, bicache_table=table,
                                              bicache_interval=4))
    msgs = chat("countdown 12 5 -> 60", system="Solve the puzzle. " * 12)
    kw = dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy")
    with TestClient(create_app(served)) as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 16, "steps": 16,
                                                 "temperature": 0, "alg": "entropy"}).json()
    ids, P = chat_prefix(tok, msgs)
    x, _ = get("dream").generate(be, torch.tensor([ids]), prefix_store=BiCache(BiCacheStore(TOKENS), table, [P], 4),
                                 **kw)
    toks = x[0, len(ids):].tolist()
    assert r["choices"][0]["message"]["content"] == tok.decode(toks[:answer_end(toks, be.info.stop_ids)],
                                                               skip_special_tokens=True)
    assert r["dlmtrt"][0]["bicache_depth"] == table.serving_depth(prefix_ratio(P, len(ids) + 16), 6) > 0


def test_depths_never_share_a_cohort(model):
    """Two chats of one length, parameters and bucket, at depths 1 and 3, waiting together: two cohorts (one
    batch of both would be refused by BiCache.attach), each answered as the runtime alone."""
    tok = model[1]
    high = chat("ok", system="s" * 70 + ".")  # prefix ~80 % of the canvas
    low = chat("u" * 71, system="s.")  # the same length, the prefix ~12 %
    served = _served(model)
    prompts = [served.chat_prompt(_request(m)) for m in (high, low)]
    assert len(prompts[0][0]) == len(prompts[1][0])
    done, lock = {}, threading.Lock()

    def sink(job, kind, payload):
        with lock:
            done.setdefault(job.depth, []).append((kind, payload))
    jobs = [j for p in prompts for j in served.jobs_of(_request(high), None, "messages", sink, [p])]
    assert [j.depth for j in jobs] == [3, 1]
    assert jobs[0].key(2048)[:3] == jobs[1].key(2048)[:3] and jobs[0].key(2048) != jobs[1].key(2048)
    served.scheduler.submit(jobs)
    served.scheduler.start()
    served.scheduler.stop(60)
    for (ids, P), j in zip(prompts, jobs):
        kinds = [k for k, _ in done[j.depth]]
        assert kinds[-1] == "done", done[j.depth]
        assert done[j.depth][-1][1]["text"] == direct(model, ids, P)[0]
        assert done[j.depth][-1][1]["dlmtrt"]["cohort_batch"] == 1
    assert served.bicache.store.stats.misses == 2


def _request(messages):
    from dlmtrt.serve.protocol import ChatCompletionRequest
    return ChatCompletionRequest(messages=messages, **GEN)


# ---------------------------------------------------------------------------------------- options


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading weights fails the test: every refusal below comes before it."""
    def boom(*a, **k):
        raise AssertionError("the weights were loaded before the options were checked")
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", boom)
    monkeypatch.setattr("dlmtrt.models.loading.load", boom)


def _one_line(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in errors[0], r.output


def _bare_llada(tmp_path: Path) -> Path:
    """A copy of the fixture checkpoint without a depth table."""
    d = tmp_path / "ckpt"
    shutil.copytree(CKPT, d)
    (d / "bicache.json").unlink(missing_ok=True)
    return d


def test_serve_options_refuse_what_cannot_be_served_before_loading(tmp_path, no_weights, tiny_dir):
    run = CliRunner().invoke
    bare = str(_bare_llada(tmp_path))
    _one_line(run(main, ["serve", "-m", bare, "--prefix-cache-mb", "8"]), "no bicache.json", "bicache-profile")
    _one_line(run(main, ["serve", "-m", bare, "--prefix-cache-mode", "freeze"]), "needs --prefix-cache-mb")
    _one_line(run(main, ["serve", "-m", bare, "--bicache-interval", "4"]), "--bicache-interval needs --prefix-cache-mb")
    _one_line(run(main, ["serve", "-m", "tiny-llada-tasks", "--backend", "torch-graph", "--prefix-cache-mb", "8"]),
              "the torch-graph backend cannot", "--backend torch", "--prefix-cache-mode freeze")
    table = tmp_path / "t.json"
    write_table(table, {"layers": 6, "threshold": 0.97, "table": {"0": 1}})
    _one_line(run(main, ["serve", "-m", bare, "--prefix-cache-mb", "8", "--bicache-table", str(table)]),
              "6-layer model, this one has 4")
    _one_line(run(main, ["serve", "-m", bare, "--prefix-cache-mb", "8", "--prefix-cache-mode", "freeze",
                         "--bicache-table", str(table)]), "--bicache-table applies to BiCache")
    sdar = str(tiny_dir("sdar"))
    _one_line(run(main, ["serve", "-m", sdar, "--prefix-cache-mode", "bicache"]), "block-causal", "already exact")


def test_tensorrt_engines_are_refused_bicache_with_the_reason():
    from dlmtrt.errors import UsageError
    from dlmtrt.models.loading import open_checkpoint
    from dlmtrt.serve.reuse import plan_reuse
    args = open_checkpoint("tiny-llada-tasks").args
    kw = dict(family="llada", block_causal=False, args=args, dtype="bfloat16", model_dir=CKPT, mb=8, mode=None,
              table_file=None, interval=None, block_causal_mb=256)
    with pytest.raises(UsageError, match="TensorRT engines cannot.*dlmtrt serve --backend torch"):
        plan_reuse(backend="tensorrt", deep_rows=False, **kw)
    assert plan_reuse(backend="tensorrt", deep_rows=False, **{**kw, "mode": "freeze"}).lossy


def test_freeze_is_asked_for_and_said_to_be_lossy_on_bidirectional_families(tmp_path, monkeypatch):
    from dlmtrt.models.loading import open_checkpoint
    from dlmtrt.serve.reuse import plan_reuse, token_bytes
    args = open_checkpoint("tiny-llada-tasks").args
    kw = dict(family="llada", block_causal=False, backend="torch", deep_rows=True, args=args, dtype="float32",
              model_dir=Path(open_checkpoint("tiny-llada-tasks").path), table_file=None, interval=None,
              block_causal_mb=256)
    assert plan_reuse(mb=None, mode=None, **kw).mode == "off"  # off unless asked for
    bicache = plan_reuse(mb=8, mode=None, **kw)  # the shipped table
    per = (2 * 6 * 8 * 32 + 7 * 256) * 4  # K and V of 6 layers of 8 heads of 32, 7 hidden states of 256, fp32
    assert bicache.mode == "bicache" and bicache.token_bytes == token_bytes(args, "float32") == per
    assert bicache.bicache_tokens == (8 << 20) // per and bicache.interval == 16
    freeze = plan_reuse(mb=8, mode="freeze", **kw)
    assert freeze.mode == "freeze" and freeze.lossy and freeze.freeze_bytes == 8 << 20
    assert "lossy" in freeze.describe("llada") and "0.285 -> 0.170" in freeze.describe("llada")
    sdar = plan_reuse(**{**kw, "family": "sdar", "block_causal": True, "mb": None, "mode": None})
    assert sdar.mode == "freeze" and not sdar.lossy and "exact" in sdar.describe("sdar")
    from dlmtrt.cli.serve import reuse_plan
    from dlmtrt.runtime.backends import describe_model
    src = describe_model("torch", "tiny-llada-tasks")
    plan, table = reuse_plan("tiny-llada-tasks", "torch", src, None, 8, None, None, 4)
    assert plan.interval == 4 and table == read_table(plan.table_path, 6)[0]
    from dlmtrt.errors import DlmtrtError

    def stop(*a):
        raise DlmtrtError("stopped before binding")
    monkeypatch.setattr("dlmtrt.serve.server.bind", stop)
    r = CliRunner().invoke(main, ["serve", "-m", "tiny-llada-tasks", "--prefix-cache-mb", "8", "--prefix-cache-mode",
                                  "freeze"])
    assert r.exit_code == 1 and "stopped before binding" in r.output
    assert "warning: --prefix-cache-mode freeze is lossy for llada models" in r.output


# ---------------------------------------------------------------------------------------- profiling


def _conversations(tmp_path: Path) -> Path:
    """The authors' fixture conversations (long last turns, so low ratios too) as a conversations file."""
    convs = json.loads((FIX / "conversations.json").read_text())["conversation"]
    p = tmp_path / "chats.json"
    p.write_text(json.dumps(convs))
    return p


def test_the_profile_command_writes_a_table_the_server_reads(tmp_path):
    from dlmtrt.evals.bicache_profile import bucket, conversation_samples, read_conversations
    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.bicache import profile
    chats, out = _conversations(tmp_path), tmp_path / "t.json"
    r = CliRunner().invoke(main, ["bicache-profile", "-m", str(CKPT), "--conversations", str(chats), "--per-bucket",
                                  "2", "--min-ratio", "4", "--max-ratio", "40", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    table, _ = read_table(out, 4)
    ratios, depths = zip(*table.depths)
    assert list(ratios) == sorted(ratios) and list(depths) == sorted(set(depths))  # it only grows
    assert doc["buckets"] == {"first": 4, "last": 40, "per_bucket": 2} and doc["samples"]["profiled"] == 74
    assert doc["samples"]["source"] == "conversations" and len(doc["bucket_means"]["4"]) == 4
    assert doc["samples"]["skipped_too_long"] > 0  # longer than the model's 2048 positions
    be, tok, _ = make_backend("torch", str(CKPT))
    samples, _ = conversation_samples(tok, read_conversations(chats), 2048)
    b = bucket(samples, 2, 4, 40)
    want, _ = profile(be, [[(s.prefix, s.rest) for s in k] for k in b.samples], 0.97, b.first)
    assert {int(k): v for k, v in doc["table"].items()} == want
    assert "ratio from" in r.output and "layers reused" in r.output


def test_the_task_samples_profile_a_range_of_buckets(tmp_path):
    out = tmp_path / "t.json"
    r = CliRunner().invoke(main, ["bicache-profile", "-m", "tiny-llada-tasks", "--min-ratio", "40", "--max-ratio",
                                  "44", "--per-bucket", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["buckets"] == {"first": 40, "last": 44, "per_bucket": 1}
    assert doc["samples"]["tasks"] == ["sudoku4", "countdown"] and sorted(doc["bucket_means"]) == \
        ["40", "41", "42", "43", "44"]
    table, _ = read_table(out, 6)
    assert table.depths[0][0] == 40 and table.serving_depth(39, 6) == 0  # below the table: no reuse


def test_the_profile_command_refuses_an_empty_bucket_and_an_unwritable_out_first(tmp_path, no_weights,
                                                                                  monkeypatch):
    chats = _conversations(tmp_path)
    run = CliRunner().invoke
    r = run(main, ["bicache-profile", "-m", str(CKPT), "--conversations", str(chats), "--per-bucket", "2",
                   "--min-ratio", "4", "--max-ratio", "62", "-o", str(tmp_path / "t.json")])
    _one_line(r, "ratio bucket 61", "has 0 of 2 samples", "every bucket from 4 to 62")
    r = run(main, ["bicache-profile", "-m", "tiny-llada-tasks", "--min-ratio", "0", "--max-ratio", "6", "-o",
                   str(tmp_path / "t.json")])
    _one_line(r, "ratio bucket 0", "the task samples reach buckets", "--conversations")
    (tmp_path / "file").write_text("x")
    r = run(main, ["bicache-profile", "-m", str(CKPT), "-o", str(tmp_path / "file" / "t.json")])
    _one_line(r, "--out")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[{"role": "user"}]]))
    _one_line(run(main, ["bicache-profile", "-m", str(CKPT), "--conversations", str(bad)]), "conversation 0 message 0")
    _one_line(run(main, ["bicache-profile", "-m", str(CKPT), "--conversations", str(bad), "--task", "sudoku4"]),
              "give one")
    from dlmtrt.runtime.backends import ModelSource, describe_model
    src = describe_model("torch", str(CKPT))
    monkeypatch.setattr("dlmtrt.runtime.backends.describe_model",
                        lambda b, m: ModelSource(Path("/proc/no-such-dir"), src.family, src.args))
    _one_line(run(main, ["bicache-profile", "-m", str(CKPT)]), "--out", "/proc/no-such-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "chats.json", "file"]
