"""Replicas: several `iclcls serve` processes on one PostgreSQL store, as real processes on
127.0.0.1 against a real throwaway PostgreSQL cluster (tests/pg_cluster.py; skipped only where
the server binaries are absent). Read-your-writes across replicas (min_seq, and without it
within 2 s), a retry on the other replica under the same Idempotency-Key, kill -9 of a replica
in the middle of an addition (the other goes on; the addition is whole or absent; the restarted
one converges to the same seq and the same predictions), `label --store` with a class added
live; in process: the PostgreSQL store's protocol, a snapshot that does not hold up
classification, and a label resume that keeps its store seq (SQLite). Two servers and one
cluster are shared by the module.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time

import httpx
import pg_cluster
import pytest
from test_serve import BASE, NEW, PER_CLASS, REPO, Server, _add, _classes, _classify, banking, base_state  # noqa: F401

PROBE_CLASSES = BASE + NEW


@pytest.fixture(scope="session")
def cluster():
    reason = pg_cluster.why_not()
    if reason:
        pytest.skip(reason)
    c = pg_cluster.Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pair(cluster, base_state, tmp_path_factory):
    """Replicas A and B on one store (B may be replaced by a test; all stopped at the end)."""
    import shutil

    state = tmp_path_factory.mktemp("replicas") / "state"
    shutil.copytree(base_state, state)
    url = cluster.create_db("replicas")
    servers = {"A": Server(state, "--follow-poll-s", "0.5", store=url),
               "B": Server(state, "--follow-poll-s", "0.5", store=url)}
    servers["url"] = url
    yield servers
    for k in ("A", "B"):
        servers[k].stop()


def _seq(srv: Server) -> int:
    r = httpx.get(srv.url + "/healthz", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["seq"]


# -- the store alone ------------------------------------------------------------------------------
def test_postgres_store_orders_writers_and_notifies(cluster):
    from iclcls.store import KeyConflict, open_store

    url = cluster.create_db("protocol")
    a, b = open_store(url), open_store(url)
    try:
        assert a.multi_writer and a.location == url and a.seq() == 0
        assert a.append({"n": 1}, key="k1", digest="d1", response={"r": 1}).seq == 1
        again = b.append({"n": 1}, key="k1", digest="d1", response={"r": 2})  # a retry on another writer
        assert (again.seq, again.response, again.duplicate) == (1, {"r": 1}, True)
        with pytest.raises(KeyConflict):
            b.append({"n": 2}, key="k1", digest="d2", response={})
        woke: list[float] = []
        waiter = threading.Thread(target=lambda: (b.wait(1, 10), woke.append(time.time())))
        waiter.start()
        time.sleep(0.3)
        with a.ordered():  # while A holds the order, B cannot commit: B's append waits for it
            t0 = time.time()
            late = concurrent.futures.ThreadPoolExecutor(1).submit(b.append, {"n": 3}, key=None, digest="d3", response={})
            time.sleep(0.5)
            assert not late.done()
            assert a.append({"n": 2}, key=None, digest="d2", response={}).seq == 2
        assert late.result(timeout=10).seq == 3
        waiter.join(10)
        assert woke and woke[0] - t0 < 2  # the notification woke the follower
        assert [r.seq for r in b.records_after(0)] == [1, 2, 3]
        sa, sb = a.snapshots(), b.snapshots()
        with sa.turn() as mine, sb.turn() as theirs:
            assert (mine, theirs) == (True, False)  # one snapshot writer at a time
        sa.close()
        sb.close()
    finally:
        a.close()
        b.close()


def test_a_snapshot_does_not_hold_up_classification(base_state, tmp_path, banking, embedder, monkeypatch):
    """The save holds the add lock, not the read lock: while it runs and an addition waits for it,
    predictions still answer at once (before, a waiting addition made them wait behind the save).
    And stale stages are refreshed on a schedule, swapped in under the same lock."""
    import shutil

    from iclcls.serve.state import LiveClassifier
    from iclcls.store.additions import Addition
    from iclcls.store.snapshots import Snapshots

    train, test = banking
    state = tmp_path / "state"
    shutil.copytree(base_state, state)
    live = LiveClassifier(state, store=tmp_path / "adds.sqlite", embedder=embedder, refresh_every_s=0.2)
    try:
        refreshed = threading.Event()
        real_refresh = live.clf.refresh_stale

        def refresh(*, swap):  # the background refresh calls it on schedule with the state's change lock
            with swap():
                assert not live._add_lock.acquire(blocking=False)  # held: a snapshot sees a stage before or after
            refreshed.set()
            return real_refresh(swap=swap)

        monkeypatch.setattr(live.clf, "refresh_stale", refresh, raising=False)
        assert refreshed.wait(10)
        live.add(Addition.build([(t, NEW[0]) for t in train[NEW[0]][:5]]))
        real_write, saving = Snapshots.write, threading.Event()

        def slow_write(self, clf, seq):
            saving.set()
            time.sleep(2.0)
            return real_write(self, clf, seq)

        monkeypatch.setattr(Snapshots, "write", slow_write)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            snap = pool.submit(live.snapshot)
            assert saving.wait(10)
            adding = pool.submit(live.add, Addition.build([(t, NEW[1]) for t in train[NEW[1]][:5]]))
            time.sleep(0.2)
            t0 = time.perf_counter()
            preds = live.predict([test[c][0] for c in BASE])
            waited = time.perf_counter() - t0
            assert len(preds) == len(BASE) and waited < 1.0, f"classification waited {waited:.2f} s for a snapshot"
            assert not adding.done()  # the addition waits for the consistent save
            assert snap.result(timeout=30) == 1 and adding.result(timeout=30).seq == 2
    finally:
        live.close(final_snapshot=False)


# -- replicas ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_addition_on_one_replica_is_read_on_the_other(pair, banking):
    train, test = banking
    a, b = pair["A"], pair["B"]
    new = NEW[0]
    out = _add(a, new, train[new][:10], key="add-new-0")
    seq = out["seq"]
    preds = _classify(b, test[new][:5], min_seq=seq)  # read your write on the other replica
    assert sum(p["labels"][0] == new for p in preds) >= 4
    assert _seq(b) >= seq and httpx.get(b.url + "/v1/classes").json()["seq"] >= seq

    t_ack = time.time()
    second = _add(a, NEW[1], train[NEW[1]][:10])  # without min_seq: visible on B within 2 s
    while _seq(b) < second["seq"]:
        assert time.time() - t_ack < 2.0, "B did not apply A's addition within 2 s"
        time.sleep(0.02)
    assert _classes(b)[NEW[1]] == 10

    # a retry of the first addition on B, same key: the first answer, nothing added twice
    r = httpx.post(b.url + "/v1/classes", json={"examples": [{"text": t, "label": new} for t in train[new][:10]]},
                   headers={"Idempotency-Key": "add-new-0"}, timeout=60)
    assert r.status_code == 200 and r.json()["seq"] == seq and r.json()["replayed"], r.text
    assert _classes(a)[new] == _classes(b)[new] == 10

    too_far = httpx.post(b.url + "/v1/classify", json={"texts": ["hi"], "min_seq": 10_000}, timeout=60)
    assert too_far.status_code == 503 and "not yet 10000" in too_far.json()["error"]["message"]


@pytest.mark.slow
def test_kill9_of_a_replica_mid_addition(pair, banking):
    """kill -9 A while it applies/commits an addition: B goes on serving, the addition is in the
    store whole or not at all, and A restarted converges to B's seq with B's predictions."""
    import psycopg

    train, test = banking
    a, b = pair["A"], pair["B"]
    labels = ["card_swallowed", "cash_withdrawal_charge", "declined_transfer", "get_physical_card"]
    n = 40
    bodies = {lab: {"examples": [{"text": t, "label": lab} for t in train[lab][:n]]} for lab in labels}
    start_seq = _seq(a)

    def send(srv, lab):
        try:
            r = httpx.post(srv.url + "/v1/classes", json=bodies[lab], headers={"Idempotency-Key": f"kill-{lab}"},
                           timeout=60)
            return r.status_code, r.json()
        except httpx.TransportError:
            return None, None

    with concurrent.futures.ThreadPoolExecutor(len(labels)) as pool:
        futs = {lab: pool.submit(send, a, lab) for lab in labels}
        deadline = time.time() + 60
        while f"seq={start_seq + 1} committed" not in a.log_text():
            assert time.time() < deadline, a.log_text()[-2000:]
            time.sleep(0.002)
        a.kill9()
        answers = {lab: f.result() for lab, f in futs.items()}
    acked = {lab: body for lab, (status, body) in answers.items() if status == 200}
    assert len(acked) < len(labels), "every addition was acknowledged before the kill"

    assert len(_classify(b, [test[c][0] for c in BASE])) == len(BASE)  # B goes on
    with psycopg.connect(pair["url"]) as c:
        rows = c.execute("SELECT seq, idempotency_key, body FROM iclcls_additions WHERE seq > %s ORDER BY seq",
                         (start_seq,)).fetchall()
    stored = {key.removeprefix("kill-"): len(json.loads(body)["examples"]) for _, key, body in rows}
    assert all(v == n for v in stored.values()), stored  # whole or absent
    assert set(acked) <= set(stored) and [s for s, _, _ in rows] == list(range(start_seq + 1, start_seq + 1 + len(rows)))

    pair["A"] = a = a.restart()
    head = start_seq + len(rows)
    deadline = time.time() + 10
    while _seq(b) < head:
        assert time.time() < deadline
        time.sleep(0.05)
    assert _seq(a) == _seq(b) == head
    probe = [test[c][i] for c in PROBE_CLASSES for i in range(2)]
    pa, pb = _classify(a, probe, top_k=3), _classify(b, probe, top_k=3)
    assert [p["labels"] for p in pa] == [p["labels"] for p in pb]
    assert all(abs(x - y) < 1e-4 for p, q in zip(pa, pb) for x, y in zip(p["scores"], q["scores"]))

    # the unacknowledged ones retried on B with their keys: each once; the acknowledged keep their seq
    for lab in labels:
        status, body = send(b, lab)
        assert status == 200, body
        if lab in acked:
            assert body["seq"] == acked[lab]["seq"]
    assert all(_classes(b)[lab] == n for lab in labels)
    print(f"\n[replicas] kill -9 with {len(labels)} additions in flight on A: {len(acked)} acknowledged, "
          f"{len(rows)} in the store (each whole); after retries on B each once: lost 0, doubled 0")


@pytest.mark.slow
def test_label_with_the_store_sees_a_class_added_live(pair, banking, tmp_path):
    train, test = banking
    a, b = pair["A"], pair["B"]
    new = "passcode_forgotten"
    seq = _add(b, new, train[new][:10], key="label-new")["seq"]
    inp = tmp_path / "in.jsonl"
    texts = test[new][:4] + [test[BASE[0]][0]]
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "iclcls.cli", "label", str(inp), "--state", str(a.state), "--store", pair["url"],
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["labels"][0] == new for r in rows[:4]) >= 3
    meta = json.loads(out.with_name("out.jsonl.meta.json").read_text())
    assert meta["options"]["store_seq"] == seq and meta["options"]["store"] == pair["url"]


def test_label_store_resume_keeps_its_seq(base_state, tmp_path, banking, embedder):
    """A run records the store's seq; a resume after more additions labels at the same seq."""
    import shutil

    from iclcls.label import LabelOptions, label_corpus
    from iclcls.serve.state import LiveClassifier
    from iclcls.store.additions import Addition

    train, test = banking
    state, store = tmp_path / "state", tmp_path / "adds.sqlite"
    shutil.copytree(base_state, state)

    def add(label):
        live = LiveClassifier(state, store=store, embedder=embedder, refresh_every_s=0)
        try:
            return live.add(Addition.build([(t, label) for t in train[label][:10]])).seq
        finally:
            live.close(final_snapshot=False)

    assert add(NEW[0]) == 1
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = test[NEW[0]][:3] + test[NEW[1]][:3]
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    opts = dict(store=str(store), progress=False, chunk_rows=3)
    label_corpus(inp, state=state, out=out, options=LabelOptions(limit=3, **opts))
    meta = json.loads(out.with_name("out.jsonl.meta.json").read_text())
    assert meta["options"]["store_seq"] == 1 and meta["options"]["store"] == str(store)
    assert add(NEW[1]) == 2
    summary = label_corpus(inp, state=state, out=out, options=LabelOptions(**opts))
    assert (summary.rows_skipped, summary.rows_done) == (3, 3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["labels"][0] == NEW[0] for r in rows[:3]) >= 2  # added at seq 1: used
    assert all(r["labels"][0] != NEW[1] for r in rows)  # added at seq 2: not in this output
    fresh = label_corpus(inp, state=state, out=out, options=LabelOptions(overwrite=True, **opts))
    assert fresh.rows_done == 6 and json.loads(out.with_name("out.jsonl.meta.json").read_text())["options"]["store_seq"] == 2
