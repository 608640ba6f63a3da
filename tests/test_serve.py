"""The classification service as a real process on 127.0.0.1, driven over HTTP with httpx:
start, classify, add a class live, classify with it, bad texts in a micro-batch, kill -9
(after acknowledged additions and in the middle of several), retries with Idempotency-Key,
two servers on one store, a store whose writes fail (a file-size limit), restart, auth with
two keys, the Host check, caps and size limits, bind refusal. The state is the retriever
alone (kNN vote, no LM) fitted on a small BANKING77 subset, so a server starts in seconds;
one slow test serves SmolLM2 to see micro-batching. (The store and rollback in process:
tests/test_serve_store.py.)
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BASE = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_phone", "pin_blocked"]
NEW = ["terminate_account", "age_limit", "apple_pay_or_google_pay"]
PER_CLASS = 20
REPO = Path(__file__).resolve().parents[1]
FAULTS = collections.Counter()  # faults injected and bad inputs tried, counted by the tests that make them


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
    """`iclcls serve` as a child process, its log in a file (the store: the default beside the state
    folder unless ``store`` is given)."""

    def __init__(self, state: Path, *args: str, env: dict | None = None, store: Path | None = None,
                 preexec_fn=None) -> None:
        self.state, self.args, self.env, self.store = state, args, env, store
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "iclcls.cli", "serve", "--state", str(state), "--port", str(self.port), *args]
        cmd += ["--store", str(store)] if store is not None else []
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=REPO, preexec_fn=preexec_fn)
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
        return Server(self.state, *self.args, env=self.env, store=self.store)

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

    def start(*args: str, env: dict | None = None, restart_of: Server | None = None, **kw) -> Server:
        s = restart_of.restart() if restart_of else Server(state, *args, env=env, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _classify(srv: Server, texts: list[str], **kw) -> list[dict]:
    r = httpx.post(srv.url + "/v1/classify", json={"texts": texts, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _add(srv: Server, label: str, texts: list[str], *, key: str | None = None, **kw) -> dict:
    headers = {"Idempotency-Key": key} if key else {}
    r = httpx.post(srv.url + "/v1/classes", json={"examples": [{"text": t, "label": label} for t in texts], **kw},
                   headers=headers, timeout=120)
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
    assert not (srv.state / "serve").exists() and srv.state.with_name("state.additions.sqlite").is_file()  # beside DIR
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

    # a text the tokenizer cannot take fails alone, with 422 naming it, even inside a micro-batch
    good = [test[c][1] for c in BASE] + [test[NEW[0]][1]]
    raw = [json.dumps({"texts": [t]}).encode() for t in good] + [b'{"texts": ["ok", "ab\\ud800cd"]}']
    with concurrent.futures.ThreadPoolExecutor(len(raw)) as pool:
        answers = list(pool.map(lambda body: httpx.post(srv.url + "/v1/classify", content=body, timeout=120,
                                                        headers={"content-type": "application/json"}), raw))
    assert [r.status_code for r in answers] == [200] * len(good) + [422], [r.text for r in answers]
    assert "text 1: contains a lone surrogate" in answers[-1].json()["error"]["message"]
    bad_bodies = {b'{"texts": ["nul\\u0000byte"]}': "text 0: contains a NUL", b'{"texts": ["\\udfff"]}': "text 0: contains",
                  b'{"examples": [{"text": "a\\ud800", "label": "x"}]}': "examples.0.text",
                  b'{"examples": [{"text": "a", "label": "x\\u0000"}]}': "examples.0.label"}
    for body, where in bad_bodies.items():
        path = "/v1/classes" if b"examples" in body else "/v1/classify"
        r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and where in r.json()["error"]["message"], r.text
    FAULTS["bad inputs tried"] += 1 + len(bad_bodies)
    print(f"\n[faults] bad texts sent: {1 + len(bad_bodies)}, each 422 alone; the {len(good)} batched with one: 200")

    # top_k above the shortlist says so; scores come with their softmax
    wide = httpx.post(srv.url + "/v1/classify", json={"texts": [test[BASE[0]][2]], "top_k": 50}).json()
    assert wide["shortlist_k"] >= len(wide["predictions"][0]["labels"])
    assert "top_k=50 is more than" in wide["warnings"][0]
    probs = wide["predictions"][0]["probabilities"]
    assert abs(sum(probs) - 1) < 1e-6 and probs == sorted(probs, reverse=True)
    assert "warnings" not in httpx.post(srv.url + "/v1/classify", json={"texts": ["hi"], "top_k": 1}).json()
    spec = httpx.get(srv.url + "/openapi.json").json()["components"]["schemas"]["PredictionOut"]["properties"]
    assert "softmax" in spec["probabilities"]["description"] and "higher is better" in spec["scores"]["description"].lower()

    # a loopback server answers only to its own names (DNS rebinding)
    for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "localhost"):
        assert httpx.get(srv.url + "/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{srv.port}", f"127.0.0.1:{srv.port + 1}", "127.0.0.1.evil.example"):
        r = httpx.get(srv.url + "/v1/classes", headers={"Host": host})
        assert r.status_code == 421 and "DNS rebinding" in r.json()["error"]["message"], host

    metrics = httpx.get(srv.url + "/metrics").text
    assert _metric(metrics, "iclcls_classes") == 8
    assert _metric(metrics, "iclcls_pool_size") == 5 * PER_CLASS + 26
    assert _metric(metrics, "iclcls_additions_total") == 3
    assert _metric(metrics, 'iclcls_requests_total{endpoint="/v1/classify",method="POST",status="200"}') >= len(texts) + 3
    calls, requests = _metric(metrics, "iclcls_batch_requests_count"), _metric(metrics, "iclcls_batch_requests_sum")
    assert requests > calls, "no two concurrent requests shared a classifier call"


@pytest.mark.slow
def test_page_docs_auth_and_limits(serve):
    key, admin_key = "s3cret-key", "adm1n-key"
    srv = serve("--api-key-env", "ICLCLS_TEST_KEY", "--admin-key-env", "ICLCLS_TEST_ADMIN", "--max-texts", "4",
                "--max-text-chars", "200", "--max-examples", "5", "--max-body-bytes", "20000", "--max-classes", "6",
                "--max-pool", str(len(BASE) * PER_CLASS + 5), env={"ICLCLS_TEST_KEY": key, "ICLCLS_TEST_ADMIN": admin_key})
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
    # two keys: the classify key classifies; adding and listing classes take the admin key (which may do all)
    admin = {"Authorization": f"Bearer {admin_key}"}
    one = {"examples": [{"text": "my card got eaten by the machine", "label": "card_swallowed"}]}
    for r in (httpx.get(srv.url + "/v1/classes", headers=ok), httpx.post(srv.url + "/v1/classes", json=one, headers=ok)):
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"], r.text
    assert httpx.post(srv.url + "/v1/classify", json=body, headers=admin).status_code == 200
    assert httpx.get(srv.url + "/v1/classes", headers=admin).status_code == 200

    def post(path, body=None, **kw):
        auth = admin if path == "/v1/classes" else ok
        r = httpx.post(srv.url + path, json=body, headers={**auth, **kw.pop("headers", {})}, **kw)
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
    listed = httpx.get(srv.url + "/v1/classes", headers=admin).json()
    assert {c["label"]: c["examples"] for c in listed["classes"]} == {c: PER_CLASS for c in BASE}  # nothing refused was added

    # caps on classes and pool size: 409 naming the flag, nothing added
    assert httpx.post(srv.url + "/v1/classes", json={"examples": one["examples"] * 4}, headers=admin).status_code == 200
    over_classes = post("/v1/classes", {"examples": [{"text": "how old must I be", "label": "age_limit"}]})
    assert over_classes.status_code == 409 and "--max-classes" in over_classes.json()["error"]["message"]
    over_pool = post("/v1/classes", {"examples": one["examples"] * 2})
    assert over_pool.status_code == 409 and "--max-pool" in over_pool.json()["error"]["message"]
    listed = httpx.get(srv.url + "/v1/classes", headers=admin).json()
    assert listed["count"] == 6 and listed["pool_size"] == len(BASE) * PER_CLASS + 4 and listed["seq"] == 1


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
    FAULTS["kill -9"] += 1

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
def test_kill9_during_additions_then_retries_with_the_same_keys(serve, banking):
    """Six additions in flight, each under its own Idempotency-Key; kill -9 as soon as the first is
    committed (between the store's commit and its acknowledgement, or while the next ones are
    applied). After the restart every acknowledged addition is there exactly once and the others
    whole or not at all; retrying all six with their keys leaves each exactly once, and the
    acknowledged ones get their first seq back."""
    train, _ = banking
    labels = ["card_swallowed", "cash_withdrawal_charge", "declined_transfer", "get_physical_card",
              "passcode_forgotten", "transfer_timing"]
    n = 50
    bodies = {lab: {"examples": [{"text": t, "label": lab} for t in train[lab][:n]]} for lab in labels}
    srv = serve("--max-examples", "300")

    def send(lab):
        try:
            r = httpx.post(srv.url + "/v1/classes", json=bodies[lab], headers={"Idempotency-Key": f"key-{lab}"}, timeout=120)
            return r.status_code, r.json()
        except httpx.TransportError:
            return None, None

    with concurrent.futures.ThreadPoolExecutor(len(labels)) as pool:
        futs = {lab: pool.submit(send, lab) for lab in labels}
        deadline = time.time() + 120
        while "committed" not in srv.log_text():
            assert time.time() < deadline, srv.log_text()[-2000:]
            time.sleep(0.002)
        srv.kill9()
        FAULTS["kill -9"] += 1
        answers = {lab: f.result() for lab, f in futs.items()}
    acked = {lab: body for lab, (status, body) in answers.items() if status == 200}
    assert len(acked) < len(labels), "every addition was acknowledged before the kill: nothing was interrupted"

    again = serve(restart_of=srv)
    classes = _classes(again)
    for lab in labels:
        assert classes.get(lab, 0) == (n if lab in acked else classes.get(lab, 0)) and classes.get(lab, 0) in (0, n), (lab, classes)
    retried = {lab: send_to(again, lab, bodies[lab]) for lab in labels}
    for lab, body in acked.items():
        assert retried[lab]["seq"] == body["seq"] and retried[lab]["replayed"], (lab, retried[lab], body)
    assert sorted(r["seq"] for r in retried.values()) == list(range(1, len(labels) + 1))  # one seq each, none doubled
    listed = httpx.get(again.url + "/v1/classes").json()
    assert {c["label"]: c["examples"] for c in listed["classes"] if c["label"] in labels} == {lab: n for lab in labels}
    assert listed["pool_size"] == len(BASE) * PER_CLASS + n * len(labels)
    clash = httpx.post(again.url + "/v1/classes", json=bodies[labels[1]], headers={"Idempotency-Key": f"key-{labels[0]}"})
    assert clash.status_code == 422 and "different request" in clash.json()["error"]["message"]
    FAULTS["acknowledged additions checked"] += len(acked)
    print(f"\n[faults] kill -9 with {len(labels)} additions in flight: {len(acked)} acknowledged before it, "
          f"{sum(classes.get(lab, 0) == n for lab in labels)} present after restart; lost 0, doubled 0")


def send_to(srv: Server, lab: str, body: dict) -> dict:
    r = httpx.post(srv.url + "/v1/classes", json=body, headers={"Idempotency-Key": f"key-{lab}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _small_disk(limit: int):
    def limit_files() -> None:  # in the child: writes past `limit` bytes a file fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


@pytest.mark.slow
def test_a_store_that_cannot_grow_fails_additions_cleanly_and_the_service_goes_on(serve, banking, tmp_path):
    """The server runs with a 256 KiB file-size limit (a full disk for the store's journal):
    additions succeed until a commit fails, which answers 507/503 naming the store, stores
    nothing and leaves the state as it was; classification goes on. A restart without the limit
    has every acknowledged addition exactly once, none of the failed ones, and takes new ones.
    Also: a second server on the same store exits non-zero naming the lock and its holder."""
    train, test = banking
    store = tmp_path / "stores" / "adds.sqlite"
    cache = tmp_path / "small_cache"  # a fresh cache folder: the session's may already be over the limit
    cache.mkdir()
    for name in ("hf", "gguf"):
        if (Path(os.environ["ICLCLS_CACHE"]) / name).exists():
            (cache / name).symlink_to(Path(os.environ["ICLCLS_CACHE"]) / name)
    srv = serve("--max-examples", "300", "--max-text-chars", "5000", store=store, preexec_fn=_small_disk(256 * 1024),
                env={"ICLCLS_CACHE": str(cache)})
    state_files = sorted(p.relative_to(srv.state) for p in srv.state.rglob("*"))
    # long texts, few of them: records fill the journal fast while embedding stays cheap (256 tokens a text)
    filler = " and more words to make the record long" * 120
    acked, failed = {}, {}
    for i in range(24):
        lab = f"filler_{i}"
        body = {"examples": [{"text": f"{t} {filler}"[:4900], "label": lab} for t in train["atm_support"][:8]]}
        r = httpx.post(srv.url + "/v1/classes", json=body, headers={"Idempotency-Key": lab}, timeout=120)
        if r.status_code == 200:
            acked[lab] = r.json()["seq"]
            if failed:
                break  # an addition after a failed one may succeed: SQLite's journal is whole
            continue
        failed[lab] = body
        FAULTS["store write failures (EFBIG)"] += 1
        assert r.status_code in (503, 507), r.text
        msg = r.json()["error"]["message"]
        assert "was not stored" in msg and str(store) in msg, msg
        if len(failed) == 2:
            break
    assert _classify(srv, [test["card_arrival"][0]])[0]["labels"]  # serving goes on
    assert httpx.get(srv.url + "/healthz").status_code == 200
    classes = _classes(srv)
    assert all(classes[lab] == 8 for lab in acked) and not set(failed) & set(classes)
    srv.stop()  # the final snapshot may fail too: the store holds every addition

    again = serve("--max-examples", "300", "--max-text-chars", "5000", store=store)  # the same, without the limit
    try:
        classes = _classes(again)
        assert {lab: classes.get(lab) for lab in acked} == {lab: 8 for lab in acked} and not set(failed) & set(classes)
        lab, body = next(iter(failed.items()))
        r = httpx.post(again.url + "/v1/classes", json=body, headers={"Idempotency-Key": lab}, timeout=120)
        assert r.status_code == 200 and r.json()["seq"] == len(acked) + 1 and not r.json()["replayed"], r.text
        cmd = [sys.executable, "-m", "iclcls.cli", "serve", "--state", str(srv.state), "--store", str(store),
               "--port", str(_free_port())]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
        out = " ".join((second.stdout + second.stderr).split())
        assert second.returncode != 0 and f"{store}.lock is locked by pid {again.proc.pid}" in out, out
        assert f"port {again.port}" in out
        assert _classify(again, ["I want my money back"])[0]["labels"]  # the first server is untouched
    finally:
        again.stop()
    assert sorted(p.relative_to(srv.state) for p in srv.state.rglob("*")) == state_files  # DIR is never written
    print(f"\n[faults] a 256 KiB file-size limit failed {len(failed)} commits after {len(acked)} acknowledged "
          "additions; after restart all acknowledged present once, failed ones absent")


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
