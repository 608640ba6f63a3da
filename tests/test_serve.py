"""The classification service as a real process on 127.0.0.1, driven over HTTP with httpx:
start, classify, add a class live, classify with it, kill -9 (after an acknowledged addition
and in the middle of one), restart, auth, size limits, bind refusal; and the write-ahead log
on its own. The state is the retriever alone (kNN vote, no LM) fitted on a small BANKING77
subset, so a server starts in seconds; one slow test serves SmolLM2 to see micro-batching.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from iclcls.serve.wal import WALError, WriteAheadLog

BASE = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_phone", "pin_blocked"]
NEW = ["terminate_account", "age_limit", "apple_pay_or_google_pay"]
PER_CLASS = 20
REPO = Path(__file__).resolve().parents[1]


# -- data and the fitted state (one per session) -------------------------------------------------
@pytest.fixture(scope="session")
def banking(data_dir):
    """BANKING77 train/test texts by class (the original release)."""

    def read(name):
        by = collections.defaultdict(list)
        with open(data_dir / "banking77" / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                by[row["category"]].append(row["text"])
        return by

    return read("train.csv"), read("test.csv")


@pytest.fixture(scope="session")
def base_state(tmp_path_factory, banking, embedder):
    from iclcls.programs import retriever_only
    from iclcls.types import Example

    train, _ = banking
    examples = [Example(t, (c,)) for c in BASE for t in train[c][:PER_CLASS]]
    d = tmp_path_factory.mktemp("serve") / "base_state"
    retriever_only().fit(examples, tune="none").save(d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`iclcls serve` as a child process, its log in a file."""

    def __init__(self, state: Path, *args: str, env: dict | None = None) -> None:
        self.state, self.args, self.env = state, args, env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "iclcls.cli", "serve", "--state", str(state), "--port", str(self.port), *args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        self.wait_ready()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log_text()[-3000:]}")

    def restart(self) -> Server:
        return Server(self.state, *self.args, env=self.env)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


@pytest.fixture
def serve(base_state, tmp_path):
    """Start servers on a private copy of the base state; all are stopped at the end."""
    state = tmp_path / "state"
    shutil.copytree(base_state, state)
    started: list[Server] = []

    def start(*args: str, env: dict | None = None, restart_of: Server | None = None) -> Server:
        s = restart_of.restart() if restart_of else Server(state, *args, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _classify(srv: Server, texts: list[str], **kw) -> list[dict]:
    r = httpx.post(srv.url + "/v1/classify", json={"texts": texts, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _add(srv: Server, label: str, texts: list[str], **kw) -> dict:
    r = httpx.post(srv.url + "/v1/classes", json={"examples": [{"text": t, "label": label} for t in texts], **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _classes(srv: Server) -> dict[str, int]:
    r = httpx.get(srv.url + "/v1/classes", timeout=30)
    assert r.status_code == 200, r.text
    return {c["label"]: c["examples"] for c in r.json()["classes"]}


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _top1_share(preds: list[dict], label: str) -> float:
    return sum(p["labels"][0] == label for p in preds) / len(preds)


# -- the service end to end -----------------------------------------------------------------------
@pytest.mark.slow
def test_classify_add_a_class_live_and_classify_with_it(serve, banking):
    train, test = banking
    srv = serve("--batch-wait-ms", "50")
    assert _classes(srv) == {c: PER_CLASS for c in BASE}
    preds = _classify(srv, [test[c][0] for c in BASE], top_k=3)
    assert [len(p["labels"]) for p in preds] == [3] * len(BASE)
    assert sum(p["labels"][0] == c for p, c in zip(preds, BASE)) >= 4
    assert all(p["label"] == p["labels"][0] and p["scores"] == sorted(p["scores"], reverse=True) for p in preds)
    new = NEW[0]
    before = _classify(srv, test[new][:5])
    assert all(p["labels"][0] != new for p in before)  # unknown until added

    out = _add(srv, new, train[new][:10], descriptions={new: "closing the account"})
    assert out["seq"] == 1 and out["new_classes"] == [new] and out["classes"] == 6 and out["added_examples"] == 10
    after = _classify(srv, test[new][:5], trace=True)
    assert _top1_share(after, new) >= 0.8
    assert set(after[0]) >= {"labels", "scores", "candidates", "demonstrations"}
    listed = httpx.get(srv.url + "/v1/classes").json()
    assert listed["count"] == 6 and listed["pool_size"] == 5 * PER_CLASS + 10
    assert {"label": new, "examples": 10, "description": "closing the account"} in listed["classes"]

    # classification goes on while classes are added: concurrent requests all answer, and the
    # micro-batcher puts requests that arrive together into one classifier call
    texts = [t for c in BASE for t in test[c][:4]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        adds = pool.submit(lambda: [_add(srv, c, train[c][:8]) for c in NEW[1:]])
        results = list(pool.map(lambda t: _classify(srv, [t])[0], texts))
        assert [a["seq"] for a in adds.result()] == [2, 3]
    assert len(results) == len(texts)
    assert _classes(srv) == {**{c: PER_CLASS for c in BASE}, new: 10, NEW[1]: 8, NEW[2]: 8}

    metrics = httpx.get(srv.url + "/metrics").text
    assert _metric(metrics, "iclcls_classes") == 8
    assert _metric(metrics, "iclcls_pool_size") == 5 * PER_CLASS + 26
    assert _metric(metrics, "iclcls_additions_total") == 3
    assert _metric(metrics, 'iclcls_requests_total{endpoint="/v1/classify",method="POST",status="200"}') >= len(texts) + 3
    calls, requests = _metric(metrics, "iclcls_batch_requests_count"), _metric(metrics, "iclcls_batch_requests_sum")
    assert requests > calls, "no two concurrent requests shared a classifier call"


@pytest.mark.slow
def test_page_docs_auth_and_limits(serve):
    key = "s3cret-key"
    srv = serve("--api-key-env", "ICLCLS_TEST_KEY", "--max-texts", "4", "--max-text-chars", "200", "--max-examples", "5",
                "--max-body-bytes", "20000", env={"ICLCLS_TEST_KEY": key})
    # the page, its script, the docs and health hold no data: open without the key
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and 'id="classify"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(srv.url + "/static/app.js").status_code == 200
    docs = httpx.get(srv.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert httpx.get(srv.url + "/static/docs/swagger-ui-bundle.js").status_code == 200  # served, not from a CDN
    spec = httpx.get(srv.url + "/openapi.json").json()
    assert {"/v1/classify", "/v1/classes"} <= set(spec["paths"])
    assert httpx.get(srv.url + "/healthz").status_code == 200

    # Bearer auth on the API and /metrics: 401 without (or with another scheme), 403 with a wrong key
    body = {"texts": ["where is my card"]}
    missing = httpx.post(srv.url + "/v1/classify", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["status"] == 401
    assert httpx.post(srv.url + "/v1/classify", json=body, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    assert httpx.post(srv.url + "/v1/classify", json=body, headers={"Authorization": "Bearer s3cret-kez"}).status_code == 403
    for path in ("/v1/classes", "/metrics"):
        assert httpx.get(srv.url + path).status_code == 401
    assert httpx.post(srv.url + "/v1/classify", json={"bad": 1}).status_code == 401  # credentials before the body
    ok = {"Authorization": f"Bearer {key}"}
    assert httpx.post(srv.url + "/v1/classify", json=body, headers=ok).status_code == 200
    assert httpx.get(srv.url + "/metrics", headers=ok).status_code == 200

    def post(path, body=None, **kw):
        r = httpx.post(srv.url + path, json=body, headers={**ok, **kw.pop("headers", {})}, **kw)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["status"] == r.status_code and r.json()["error"]["message"]
        return r

    too_many = post("/v1/classify", {"texts": ["a b"] * 5})
    assert too_many.status_code == 413 and "--max-texts" in too_many.json()["error"]["message"]
    assert post("/v1/classify", {"texts": ["ok", "x" * 201]}).status_code == 413
    assert post("/v1/classes", {"examples": [{"text": "t", "label": "l"}] * 6}).status_code == 413
    assert post("/v1/classify", {"texts": ["x" * 30000]}).status_code == 413  # over --max-body-bytes
    chunked = httpx.post(srv.url + "/v1/classify", content=iter([b'{"texts": ["', b"y" * 25000, b'"]}']),
                         headers={**ok, "content-type": "application/json"})
    assert chunked.status_code == 413
    for bad in (
        {},
        {"texts": "one string"},
        {"texts": []},
        {"texts": ["  "]},
        {"texts": ["ok"], "top_k": 0},
        {"texts": ["ok"], "model": "gpt-4"},  # nothing in a request names a model, file or URL
    ):
        assert post("/v1/classify", bad).status_code == 422, bad
    assert "body.texts" in post("/v1/classify", {"texts": [3]}).json()["error"]["message"]
    for bad in (
        {"examples": [{"text": "t", "label": ""}]},
        {"examples": [{"text": "t", "label": "l", "file": "/etc/passwd"}]},
        {"examples": [{"text": "t", "label": "l"}], "descriptions": {"other": "d"}},
    ):
        assert post("/v1/classes", bad).status_code == 422, bad
    assert post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    listed = httpx.get(srv.url + "/v1/classes", headers=ok).json()
    assert {c["label"]: c["examples"] for c in listed["classes"]} == {c: PER_CLASS for c in BASE}  # nothing refused was added


@pytest.mark.slow
def test_refuses_non_loopback_bind_without_a_key(base_state):
    cmd = [sys.executable, "-m", "iclcls.cli", "serve", "--state", str(base_state), "--port", str(_free_port())]
    r = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "refusing to listen" in r.stdout + r.stderr
    env = {**os.environ, "ICLCLS_EMPTY_KEY": ""}
    r = subprocess.run(cmd + ["--host", "0.0.0.0", "--api-key-env", "ICLCLS_EMPTY_KEY"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and "unset or empty" in r.stdout + r.stderr


# -- durability -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_after_acknowledged_additions_then_restart(serve, banking):
    train, test = banking
    srv = serve("--snapshot-every", "2")
    for i, c in enumerate(NEW, 1):
        assert _add(srv, c, train[c][:10])["seq"] == i
    srv.kill9()  # right after the last acknowledgement: no clean shutdown, no final snapshot

    again = serve(restart_of=srv)
    assert _classes(again) == {**{c: PER_CLASS for c in BASE}, **{c: 10 for c in NEW}}
    for c in NEW:
        assert _top1_share(_classify(again, test[c][:5]), c) >= 0.6, c
    assert _add(again, "card_swallowed", train["card_swallowed"][:5])["seq"] == len(NEW) + 1  # seq goes on
    again.stop()  # a clean stop writes a snapshot; a third start loads it
    third = serve(restart_of=again)
    assert _classes(third)["card_swallowed"] == 5
    assert "(0 replayed)" in third.log_text()


@pytest.mark.slow
def test_kill9_in_the_middle_of_an_addition(serve, banking):
    """Killed after the log record is written and while it is applied: all of it comes back.
    A torn last log line (a crash inside the write) is dropped: none of it comes back."""
    train, _ = banking
    srv = serve("--max-examples", "300")
    big = [{"text": t, "label": c} for c in NEW[:2] for t in train[c][:100]]
    n_per = collections.Counter(e["label"] for e in big)

    def send():
        try:
            return httpx.post(srv.url + "/v1/classes", json={"examples": big}, timeout=120).status_code
        except httpx.TransportError:
            return None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(send)
        deadline = time.time() + 120
        while "addition seq=1 logged" not in srv.log_text():
            assert time.time() < deadline and not fut.done(), srv.log_text()[-2000:]
            time.sleep(0.005)
        srv.kill9()
        assert fut.result() is None, "the addition was acknowledged before the kill: nothing was interrupted"
    wal = srv.state / "serve" / "wal.jsonl"
    with open(wal, "ab") as f:  # a second addition torn mid-write
        f.write(b'{"seq":2,"examples":[{"text":"half a rec')

    again = serve(restart_of=srv)
    classes = _classes(again)
    got = {c: classes.get(c, 0) for c in NEW[:2]}
    assert got == dict(n_per) or got == {c: 0 for c in NEW[:2]}, got
    assert got == dict(n_per)  # the record was on disk before the apply began, so it is replayed
    assert "dropped a torn last record" in again.log_text()
    assert _add(again, NEW[2], train[NEW[2]][:3])["seq"] == 2  # the torn record's seq is reused
    assert _classify(again, ["I want to close my account"])[0]["labels"]


# -- the write-ahead log on its own ---------------------------------------------------------------
def test_wal_torn_tail_corruption_and_compaction(tmp_path):
    path = tmp_path / "wal.jsonl"
    wal = WriteAheadLog(path)
    assert [wal.append({"examples": [{"text": f"t{i}", "label": "a"}]}) for i in range(3)] == [1, 2, 3]
    wal.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": 4, "exa')
    wal = WriteAheadLog(path)
    assert wal.dropped_tail and [r["seq"] for r in wal.records] == [1, 2, 3]
    assert path.read_bytes().endswith(b"\n")  # the torn bytes are cut off, so appends stay whole
    assert wal.append({"examples": []}) == 4
    wal.compact(2)
    assert wal.append({"examples": []}) == 5
    wal.close()
    wal = WriteAheadLog(path)
    assert [r["seq"] for r in wal.after(0)] == [3, 4, 5] and not wal.dropped_tail
    wal.close()

    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    with pytest.raises(WALError, match=r"wal.jsonl:2: not a JSON record"):
        WriteAheadLog(path)
    path.write_text(lines[1] + "\n" + lines[0] + "\n")
    with pytest.raises(WALError, match="out of order"):
        WriteAheadLog(path)


# -- micro-batching with a real LM ----------------------------------------------------------------
@pytest.mark.slow
def test_micro_batching_with_smollm2(tmp_path, banking, embedder, smollm):
    from iclcls.programs import knn_fusion
    from iclcls.types import Example

    train, test = banking
    state = tmp_path / "lm_state"
    examples = [Example(t, (c,)) for c in BASE[:3] for t in train[c][:6]]
    knn_fusion(lm=smollm, shots=2, shortlist_k=3).fit(examples, tune="none").save(state)
    srv = Server(state, "--lm", "smollm2", "--batch-wait-ms", "200")
    try:
        texts = [test[c][0] for c in BASE[:3]] * 2
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            preds = list(pool.map(lambda t: _classify(srv, [t], trace=True)[0], texts))
        assert all(len(p["demonstrations"]) == 2 and p["prompt"] for p in preds)
        assert sum(p["labels"][0] == c for p, c in zip(preds, BASE[:3] * 2)) >= 3
        m = httpx.get(srv.url + "/metrics").text
        assert _metric(m, "iclcls_batch_requests_sum") == len(texts) + 0  # the warm-up call is not an HTTP request
        assert _metric(m, "iclcls_batch_requests_count") < len(texts)
    finally:
        srv.stop()
