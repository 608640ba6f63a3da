"""The service's store of additions and its all-or-nothing additions, in process (no server):
the SQLite store (sequence, idempotency keys, one writer, damage), LiveClassifier rollback when
a stage raises inside an addition, caps, the import of the old in-folder log, the micro-batcher
retrying a failed batch one request at a time, and the shared text check.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from test_serve import BASE, NEW, PER_CLASS, banking, base_state  # noqa: F401  (fixtures)

from iclcls.serve.batcher import MicroBatcher
from iclcls.serve.state import AdditionRefused, LiveClassifier
from iclcls.store import KeyConflict, StoreError, StoreLocked, open_store
from iclcls.store.additions import Addition
from iclcls.types import check_text

BAD_TEXTS = ["ab\ud800cd", "x\udfffy", "nul\x00byte", "\ud83d"]


# -- the store alone ----------------------------------------------------------------------------
def test_sqlite_store_sequence_keys_lock_and_damage(tmp_path):
    path = tmp_path / "adds.sqlite"
    s = open_store(path, writer={"port": 1234})
    assert s.seq() == 0 and s.snapshot_dir == path.with_name("adds.sqlite.snapshots")
    a = s.append({"n": 1}, key="k1", digest="d1", response={"r": 1})
    assert (a.seq, a.duplicate) == (1, False)
    again = s.append({"n": 1}, key="k1", digest="d1", response={"r": "other"})
    assert (again.seq, again.response, again.duplicate) == (1, {"r": 1}, True)  # the first answer, nothing written
    with pytest.raises(KeyConflict, match="k1"):
        s.append({"n": 2}, key="k1", digest="d2", response={})
    assert s.append({"n": 3}, key=None, digest="d3", response={}).seq == 2
    assert s.lookup("k1").body == {"n": 1} and s.lookup("nope") is None
    with pytest.raises(StoreLocked, match=r"adds\.sqlite\.lock is locked by pid \d+ on .*port 1234"):
        open_store(path, writer={"port": 99})  # one writer per store, even within a process
    s.close()
    s = open_store(path)
    assert [r.seq for r in s.records_after(0)] == [1, 2] and s.seq() == 2
    s.close()
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="junk.sqlite: not a usable iclcls store"):
        open_store(tmp_path / "junk.sqlite")
    with pytest.raises(StoreError, match="not a store"):
        open_store("mysql://db/x")


def test_check_text_names_where_and_passes_good_text():
    assert check_text("ok \t\n é 😀", "t") == "ok \t\n é 😀"
    for bad in BAD_TEXTS:
        with pytest.raises(ValueError, match=r"^examples\.3\.text: contains"):
            check_text(bad, "examples.3.text")


def test_batcher_retries_a_failed_batch_one_request_at_a_time():
    calls = []

    def predict(texts):
        calls.append(list(texts))
        if "bad" in texts:
            raise TypeError("the tokenizer cannot take it")
        return [t.upper() for t in texts]

    b = MicroBatcher(predict, max_wait_s=0.2, max_batch=64)

    async def go():
        reqs = [["a"], ["b", "c"], ["bad"], ["d"]]
        return await asyncio.gather(*(b.submit(r) for r in reqs), return_exceptions=True)

    try:
        out = asyncio.run(go())
    finally:
        b.close()
    assert out[0] == ["A"] and out[1] == ["B", "C"] and out[3] == ["D"]
    assert isinstance(out[2], TypeError)  # only the bad request fails
    assert calls[0] == ["a", "b", "c", "bad", "d"] and ["bad"] in calls[1:]


# -- LiveClassifier: all or nothing -------------------------------------------------------------
@pytest.fixture
def live_state(base_state, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(base_state, state)
    return state


def _open(state, store, embedder, **kw):
    return LiveClassifier(state, store=store, embedder=embedder, **kw)


def _addition(label, texts):
    return Addition.build([(t, label) for t in texts])


def test_a_stage_that_raises_rolls_the_addition_back(live_state, tmp_path, banking, embedder, monkeypatch):
    train, test = banking
    store = tmp_path / "adds.sqlite"
    live = _open(live_state, store, embedder, max_classes=len(BASE) + 2)
    try:
        probe = [test[c][0] for c in BASE]
        before = [p.labels for p in live.predict(probe)]
        view = live.view
        shortlister = type(live.clf.shortlister_)

        def broken(self, pool, new_ids):  # the pool already grew when this raises: half an addition
            raise RuntimeError("stage update exploded")

        monkeypatch.setattr(shortlister, "update", broken)
        with pytest.raises(AdditionRefused, match="stage update exploded.*nothing was stored") as e:
            live.add(_addition(NEW[0], train[NEW[0]][:5]), key="k-broken")
        assert e.value.status == 422
        monkeypatch.undo()
        assert live.store.seq() == 0 and live.store.lookup("k-broken") is None  # nothing logged
        assert live.view.counts == view.counts and len(live.clf.pool_) == view.pool_size == len(BASE) * PER_CLASS
        assert [p.labels for p in live.predict(probe)] == before  # the state is as it was
        assert not live.failed

        ok = live.add(_addition(NEW[0], train[NEW[0]][:5]), key="k1")
        assert (ok.seq, ok.new_classes, ok.pool_size) == (1, [NEW[0]], len(BASE) * PER_CLASS + 5)
        retry = live.add(_addition(NEW[0], train[NEW[0]][:5]), key="k1")
        assert retry.seq == 1 and retry.replayed and live.view.counts[NEW[0]] == 5  # never doubled
        with pytest.raises(AdditionRefused, match="already used for a different request") as e:
            live.add(_addition(NEW[0], train[NEW[0]][5:7]), key="k1")
        assert e.value.status == 422
        live.add(_addition(NEW[1], train[NEW[1]][:3]))
        with pytest.raises(AdditionRefused, match=r"8 classes, over the limit of 7 \(--max-classes\)") as e:
            live.add(_addition(NEW[2], train[NEW[2]][:3]))
        assert e.value.status == 409 and live.store.seq() == 2
    finally:
        live.close(final_snapshot=False)

    again = _open(live_state, store, embedder)
    try:
        assert again.replayed == 2 and again.view.counts[NEW[0]] == 5 and again.view.counts[NEW[1]] == 3
        assert again.add(_addition(NEW[0], train[NEW[0]][:5]), key="k1").seq == 1  # keys outlive restarts
    finally:
        again.close()
    other = tmp_path / "other_state"
    shutil.copytree(live_state, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"shortlist_k"', '"shortlist_k" ', 1))
    cfg = json.loads((other / "config.json").read_text())
    cfg["params"]["shortlist_k"] = int(cfg["params"]["shortlist_k"]) + 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match="holds additions to another fitted state"):
        _open(other, store, embedder)


def test_the_old_in_folder_log_is_imported_once(live_state, tmp_path, banking, embedder):
    train, _ = banking
    wal = live_state / "serve" / "wal.jsonl"
    wal.parent.mkdir()
    recs = [{"seq": i + 1, "examples": [{"text": t, "label": c} for t in train[c][:4]], "descriptions": {}}
            for i, c in enumerate(NEW[:2])]
    wal.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"seq": 3, "exam')  # a torn last line
    store = tmp_path / "adds.sqlite"
    live = _open(live_state, store, embedder)
    try:
        assert live.store.seq() == 2 and {live.view.counts[c] for c in NEW[:2]} == {4}
    finally:
        live.close()
    assert wal.read_text().endswith('"exam')  # the state folder is only read
    live = _open(live_state, store, embedder)  # a second start does not import again
    try:
        assert live.store.seq() == 2 and live.view.counts[NEW[0]] == 4
    finally:
        live.close()
