"""`iclcls label`: streaming formats, error rows, resume and its sidecar, bad input, the CLI,
and the Ray engine on a real local Ray cluster (same rows as the local engine).

One retriever-only state fitted on the BANKING77 10-shot pool serves every test; inputs
are a few dozen real test sentences (500 for the Ray comparison).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from scripted_lm import ScriptedLM
from typer.testing import CliRunner

from iclcls.cli import app
from iclcls.label import LabelInputError, LabelOptions, ResumeRefused, label_corpus, meta_path
from iclcls.label.readers import Record
from iclcls.label.rows import RowOptions, label_records

Q = LabelOptions(progress=False, chunk_rows=8)


def opts(**kw) -> LabelOptions:
    return LabelOptions(**{**Q.__dict__, **kw})


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def banking(data_dir):
    from iclcls.data import load_benchmark

    return load_benchmark("banking77_10shot", data_dir=data_dir)


@pytest.fixture(scope="session")
def state(banking, tmp_path_factory):
    """A retriever-only state (shortlist of 5) on the 10-shot pool, saved once."""
    from iclcls.programs import retriever_only

    d = tmp_path_factory.mktemp("label") / "state"
    retriever_only(shortlist_k=5).fit(banking.train).save(d)
    return d


@pytest.fixture(scope="session")
def clf(state):
    from iclcls.classifier import ICLClassifier

    return ICLClassifier.load(state)


@pytest.fixture(scope="session")
def texts(banking):
    return [ex.text for ex in banking.test[:24]]


def test_jsonl_rows_carry_ids_labels_scores_text_and_match_predict(tmp_path, state, clf, texts):
    src = write_jsonl(tmp_path / "in.jsonl", [{"qid": f"q{i}", "body": t} for i, t in enumerate(texts)])
    out = tmp_path / "out.jsonl"
    s = label_corpus(src, state=state, out=out, options=opts(id_field="qid", text_field="body", with_text=True))
    rows = read_rows(out)
    assert (s.rows_done, s.rows_failed, s.rows_skipped) == (24, 0, 0)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(24)]
    expected = clf.predict_detailed(texts, show_progress=False)
    for r, p, t in zip(rows, expected, texts):
        assert r["labels"] == list(p.labels) and r["text"] == t and len(r["scores"]) == len(r["labels"]) == 5
        assert r["scores"] == pytest.approx(list(p.scores), abs=1e-5)
        assert "candidates" not in r and "trace" not in r  # --trace is off by default
    meta = json.loads(meta_path(out).read_text())
    assert meta["options"]["id_field"] == "qid" and len(meta["state"]) == 64


def test_csv_tsv_parquet_txt_give_the_same_labels_as_jsonl(tmp_path, state, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = texts[:12]
    t[3] = 'has "quotes", a comma\nand a newline'
    write_jsonl(tmp_path / "a.jsonl", [{"text": x} for x in t])
    pa_csv = pa.table({"text": t, "other": ["007"] * 12})
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa_csv, tmp_path / "a.csv")
    (tmp_path / "a.tsv").write_text("text\n" + "".join(x.replace("\n", " ") + "\n" for x in t))
    pq.write_table(pa_csv, tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("".join(x.replace("\n", " ") + "\n\n" for x in t))  # blank lines skipped
    got = {}
    for ext in ("jsonl", "csv", "tsv", "parquet", "txt"):
        out = tmp_path / f"{ext}.out.jsonl"
        s = label_corpus(tmp_path / f"a.{ext}", state=state, out=out, options=opts(trace=True))
        assert s.rows_failed == 0, read_rows(out)
        rows = read_rows(out)
        assert [r["id"] for r in rows] == list(range(12)), ext
        assert all(r["candidates"] and "demonstrations" in r for r in rows)  # --trace
        got[ext] = [r["labels"][0] for r in rows]
    same = [i for i in range(12) if i != 3]  # row 3 lost its newline in .tsv/.txt
    for ext in ("csv", "parquet"):
        assert got[ext] == got["jsonl"], ext
    for ext in ("tsv", "txt"):
        assert [got[ext][i] for i in same] == [got["jsonl"][i] for i in same], ext


def test_bad_rows_become_error_rows_and_the_rest_is_labelled(tmp_path, state, texts):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(texts[:6])]
    lines[2] = b'{"id": 2, "text": "unterminated'
    lines[3] = b'{"id": 3, "text": "caf\xe9 latte"}'  # Latin-1, not UTF-8
    lines[4] = json.dumps({"id": 4, "body": "no text field"}).encode()
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    s = label_corpus(src, state=state, out=out, options=opts(id_field="id"))
    rows = read_rows(out)
    assert (s.rows_done, s.rows_failed) == (6, 3)
    assert [r["id"] for r in rows] == [0, 1, "row 2", 3, 4, 5]
    assert "line 3: malformed JSON" in rows[2]["error"]
    assert "line 4: not UTF-8 (byte 0xe9" in rows[3]["error"]
    assert "no field 'text' (fields: id, body)" in rows[4]["error"]
    assert all(rows[i]["labels"] for i in (0, 1, 5))
    # the CLI exits non-zero when any row failed
    r = CliRunner().invoke(app, ["label", str(src), "--state", str(state), "--out", str(tmp_path / "o2.jsonl"),
                                 "--id-field", "id", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "3 failed" in r.output

    csv = tmp_path / "in.csv"
    csv.write_bytes(b"text,k\n" + texts[0].encode() + b",a\n" + b"x,y,z\n" + b"caf\xe9,b\n" + b'"' + texts[1].encode() + b'",c\n')
    s = label_corpus(csv, state=state, out=tmp_path / "csv.jsonl", options=opts())
    rows = read_rows(tmp_path / "csv.jsonl")
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and s.rows_failed == 2
    assert "expected 2 columns, found 3" in rows[1]["error"] and "not UTF-8" in rows[2]["error"]
    assert rows[0]["labels"] and rows[3]["labels"]


def test_bad_input_is_refused_before_any_work(tmp_path, state, texts):
    # empty file: a clear note, exit 0, no rows
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(app, ["label", str(empty), "--state", str(state), "--out", str(tmp_path / "e.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "has no rows" in r.output and "labelled 0 rows" in r.output
    assert (tmp_path / "e.jsonl").read_text() == ""
    # a missing text column names the columns there are
    src = write_jsonl(tmp_path / "a.jsonl", [{"sentence": t, "id": i} for i, t in enumerate(texts[:3])])
    with pytest.raises(LabelInputError, match=r"no column 'text'; the columns are: sentence, id"):
        label_corpus(src, state=state, out=tmp_path / "o.jsonl", options=opts())
    (tmp_path / "a.csv").write_text("sentence,id\nhello,1\n")
    r = CliRunner().invoke(app, ["label", str(tmp_path / "a.csv"), "--state", str(state), "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 65 and "the columns are: sentence, id" in " ".join(r.output.split())
    # duplicate ids: refused up front, naming the first duplicate
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": x, "text": t} for x, t in zip(["a", "b", "c", "b", "a"], texts)])
    with pytest.raises(LabelInputError, match=r"duplicate id 'b' \(rows 1 and 3"):
        label_corpus(dup, state=state, out=tmp_path / "d.out.jsonl", options=opts(id_field="id"))
    assert not (tmp_path / "d.out.jsonl").exists()
    # OUT not writable (its folder is a file): fails before reading the state
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LabelInputError, match="cannot create the output folder"):
        label_corpus(src, state=tmp_path / "no-such-state", out=blocker / "out.jsonl", options=opts(text_field="sentence"))


def test_resume_after_limit_and_torn_line_writes_each_id_once(tmp_path, state, texts):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out.jsonl"
    s = label_corpus(src, state=state, out=out, options=opts(limit=10))
    assert s.rows_done == 10 and [r["id"] for r in read_rows(out)] == list(range(10))
    with open(out, "ab") as f:  # a kill in the middle of writing a chunk
        f.write(b'{"id": 10, "labels": ["tor')
    s = label_corpus(src, state=state, out=out, options=opts())
    ids = [r["id"] for r in read_rows(out)]
    assert ids == list(range(24)) and (s.rows_done, s.rows_skipped) == (14, 10)
    s = label_corpus(src, state=state, out=out, options=opts())  # all done: nothing to do
    assert (s.rows_done, s.rows_skipped) == (0, 24) and len(read_rows(out)) == 24
    # the same with an id column and a killed CLI run is in eval/bench_label.py (resume figures)


def test_resume_with_other_options_or_state_is_refused(tmp_path, state, banking, texts):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "t2": t} for t in texts[:5]])
    out = tmp_path / "out.jsonl"
    label_corpus(src, state=state, out=out, options=opts(limit=2))
    with pytest.raises(ResumeRefused, match=r"text_field \('text' then, 't2' now\).*--overwrite"):
        label_corpus(src, state=state, out=out, options=opts(text_field="t2"))
    from iclcls.programs import retriever_only

    other = tmp_path / "other"
    retriever_only(shortlist_k=3).fit(banking.train[:100]).save(other)
    r = CliRunner().invoke(app, ["label", str(src), "--state", str(other), "--out", str(out), "--quiet"])
    assert r.exit_code == 65 and "different state" in " ".join(r.output.split())
    s = label_corpus(src, state=other, out=out, options=opts(overwrite=True))
    assert s.rows_done == 5 and all(len(r["labels"]) == 3 for r in read_rows(out))
    meta_path(out).unlink()  # rows without a sidecar cannot be resumed safely
    with pytest.raises(ResumeRefused, match="no out.jsonl.meta.json"):
        label_corpus(src, state=other, out=out, options=opts())


class _FailingLM(ScriptedLM):
    """Raises for one query, as a backend does after its retries: control flow only."""

    def score_batch(self, requests):
        if any("BOOM" in prompt for prompt, _ in requests):
            raise RuntimeError("server returned 500 after 3 retries")
        return super().score_batch(requests)


def test_an_lm_failure_fails_only_its_row(banking):
    from iclcls.programs import knn_fusion

    lm_clf = knn_fusion(lm=_FailingLM(), shots=2, shortlist_k=3).fit(banking.train[:60])
    recs = [Record(i, i, t) for i, t in enumerate(["card lost", "BOOM my card", "exchange rate", "top up"])]
    rows = label_records(lm_clf, recs, RowOptions())
    assert [("error" in r) for r in rows] == [False, True, False, False]
    assert rows[1] == {"id": 1, "error": "RuntimeError: server returned 500 after 3 retries"}


def test_predict_alias_writes_label_rows_with_trace(tmp_path, state, texts):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:3]])
    r = CliRunner().invoke(app, ["predict", str(src), "--state", str(state)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["id"] for x in rows] == [0, 1, 2] and all(x["candidates"] and x["labels"] for x in rows)


# -- the Ray engine, on a real local Ray cluster ------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_local_row_for_row(tmp_path, state, banking, ray_cluster):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": ex.text} for ex in banking.test[:500]])
    local = tmp_path / "local.jsonl"
    label_corpus(src, state=state, out=local, options=opts(chunk_rows=128))
    remote = tmp_path / "ray.jsonl"
    s = label_corpus(src, state=state, out=remote, options=opts(chunk_rows=128, engine="ray", workers=2))
    a, b = read_rows(local), read_rows(remote)
    assert s.rows_done == 500 and len(a) == len(b) == 500
    assert [r["id"] for r in b] == list(range(500))
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and x["labels"] == y["labels"], (x, y)
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)


@pytest.mark.slow
def test_ray_engine_ids_errors_and_resume(tmp_path, state, texts, ray_cluster):
    rows = [{"doc": f"d{i}", "text": t} for i, t in enumerate(texts[:12])]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[5] = '{"doc": "d5", "text": '
    src.write_text("\n".join(lines) + "\n")
    local = tmp_path / "local.jsonl"
    label_corpus(src, state=state, out=local, options=opts(id_field="doc"))
    out = tmp_path / "ray.jsonl"
    label_corpus(src, state=state, out=out, options=opts(id_field="doc", engine="ray", limit=4))
    s = label_corpus(src, state=state, out=out, options=opts(id_field="doc", engine="ray", workers=2))
    got = read_rows(out)
    assert [r["id"] for r in got] == [r["id"] for r in read_rows(local)] and s.rows_skipped == 4
    assert got[5]["id"] == "row 5" and "malformed JSON" in got[5]["error"]
    assert [r.get("labels") for r in got] == [r.get("labels") for r in read_rows(local)]


# -- outages, error rows on resume, --overwrite, refused runs ------------------------------------------


class _StatusLM(ScriptedLM):
    """Raises the client's ServerError for prompts holding a marker: control flow only.
    ``BOOM``: the server refuses that prompt (HTTP 400); ``DOWN``: the outage ``status``."""

    def __init__(self, status: int | None) -> None:
        super().__init__()
        self.status = status

    def score_batch(self, requests):
        from iclcls.lm.openai_compat import ServerError

        for marker, status in (("BOOM", 400), ("DOWN", self.status)):
            if any(marker in prompt for prompt, _ in requests):
                raise ServerError(f"http://127.0.0.1:1/v1/completions -> HTTP {status}", status=status)
        return super().score_batch(requests)


@pytest.fixture(scope="module")
def knn_lm_clf(banking):
    from iclcls.programs import knn_fusion

    clf = knn_fusion(lm=ScriptedLM(), shots=2, shortlist_k=3).fit(banking.train[:60], tune="none")

    def make(lm):
        clf.lm_ = lm
        return clf

    return make


def test_a_bad_request_is_the_rows_error_but_an_outage_stops_with_the_rows_before_it(knn_lm_clf):
    from iclcls.label import LMUnavailable

    texts = ["card lost", "BOOM my card", "exchange rate", "DOWN top up", "atm"]
    recs = [Record(i, i, t) for i, t in enumerate(texts)]
    recs.insert(1, Record(9, 9, None, "line 2: malformed JSON"))
    rows = label_records(knn_lm_clf(_StatusLM(400)), recs, RowOptions())  # prompts the server refuses
    assert [("error" in r) for r in rows] == [False, True, True, False, True, False]
    assert "HTTP 400" in rows[2]["error"]
    for status in (None, 503, 429):  # connection refused / timed out, unavailable, rate-limited after retries
        with pytest.raises(LMUnavailable) as stop:
            label_records(knn_lm_clf(_StatusLM(status)), recs, RowOptions())
        got = stop.value.rows  # the rows before the outage; nothing for the rest
        assert [r["id"] for r in got] == [0, 9, 1, 2] and [("error" in r) for r in got] == [False, True, True, False]
        with pytest.raises(LMUnavailable) as stop:  # the whole batch down: only rows without an LM call
            label_records(knn_lm_clf(_StatusLM(status)), [recs[1], Record(3, 3, "DOWN")], RowOptions())
        assert [r["id"] for r in stop.value.rows] == [9]


def test_resume_labels_error_rows_again_unless_skip_errors(tmp_path, state, texts):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in texts[:6]]
    good2, lines[2] = lines[2], '{"text": "unterminated'
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    s = label_corpus(src, state=state, out=out, options=opts())
    assert (s.rows_done, s.rows_failed) == (6, 1) and "error" in read_rows(out)[2]
    s = label_corpus(src, state=state, out=out, options=opts(skip_errors=True))  # kept as done
    assert (s.rows_done, s.rows_skipped) == (0, 6) and "error" in read_rows(out)[2]
    lines[2] = good2  # the row fixed: a plain re-run labels it again, and it is in OUT once
    src.write_text("\n".join(lines) + "\n")
    s = label_corpus(src, state=state, out=out, options=opts())
    rows = read_rows(out)
    assert (s.rows_done, s.rows_failed, s.rows_skipped) == (1, 0, 5)
    assert sorted(r["id"] for r in rows) == list(range(6)) and not any("error" in r for r in rows)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_refused_run_leaves_nothing_and_overwrite_truncates_before_the_sidecar(tmp_path, state, texts, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:4]])
    out = tmp_path / "out.jsonl"
    import shutil

    from iclcls.errors import UntrustedStateError

    odd = tmp_path / "odd"  # refused only when the state loads, after every cheap check
    shutil.copytree(state, odd)
    (odd / "link").symlink_to(src)
    with pytest.raises(UntrustedStateError, match="symbolic link"):
        label_corpus(src, state=odd, out=out, options=opts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "odd"]
    label_corpus(src, state=state, out=out, options=opts(limit=2))
    before, meta_before = out.read_bytes(), meta_path(out).read_bytes()
    with pytest.raises(UntrustedStateError):  # refused with --overwrite: the old rows stay
        label_corpus(src, state=odd, out=out, options=opts(overwrite=True))
    assert out.read_bytes() == before and meta_path(out).read_bytes() == meta_before

    import iclcls.label.output as output

    def crash(path, obj):  # the process dies between truncating OUT and writing the new sidecar
        raise OSError("killed")

    monkeypatch.setattr(output, "atomic_write_json", crash)
    with pytest.raises(OSError, match="killed"):
        label_corpus(src, state=state, out=out, options=opts(overwrite=True, with_text=True))
    monkeypatch.undo()
    assert out.read_bytes() == b"" and meta_path(out).read_bytes() == meta_before  # no old rows, old sidecar
    s = label_corpus(src, state=state, out=out, options=opts(with_text=True))  # starts over cleanly
    assert s.rows_done == 4 and all(r["text"] for r in read_rows(out))


def test_lone_surrogates_and_nul_fail_only_their_rows_naming_file_and_line(tmp_path, state, texts):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts[:5])]
    lines[1] = '{"id": "d1", "text": "ab\\ud800cd"}'  # a lone surrogate, as JSON allows
    lines[3] = '{"id": "d3", "text": "nul\\u0000byte"}'
    lines[4] = '{"id": "d\\udc00", "text": "card lost"}'  # an id that cannot be written as UTF-8
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    s = label_corpus(src, state=state, out=out, options=opts(id_field="id", with_text=True, chunk_rows=16))
    rows = read_rows(out)
    assert (s.rows_done, s.rows_failed) == (5, 3)
    assert [r["id"] for r in rows] == ["d0", "d1", "d2", "d3", "row 4"]
    assert rows[1]["error"].startswith("in.jsonl, line 2: ") and "lone surrogate" in rows[1]["error"]
    assert rows[3]["error"].startswith("in.jsonl, line 4: ") and "NUL" in rows[3]["error"]
    assert "id field 'id'" in rows[4]["error"] and "lone surrogate" in rows[4]["error"]
    assert rows[0]["labels"] and rows[2]["labels"] and rows[2]["text"] == texts[2]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [texts[0], "x\x00y"]}), tmp_path / "a.parquet")
    label_corpus(tmp_path / "a.parquet", state=state, out=tmp_path / "pq.jsonl", options=opts())
    rows = read_rows(tmp_path / "pq.jsonl")
    assert rows[0]["labels"] and rows[1]["error"].startswith("a.parquet, row 1: ") and "NUL" in rows[1]["error"]


def test_cli_prints_brackets_in_data_and_paths_as_they_are(tmp_path, state, texts):
    d = tmp_path / "runs[1]"
    d.mkdir()
    src = write_jsonl(d / "in[a].jsonl", [{"text": t} for t in texts[:2]])
    r = CliRunner().invoke(app, ["label", str(src), "--state", str(state), "--out", str(d / "out[b].jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "out[b].jsonl" in r.output and "runs[1]" in r.output
    r = CliRunner().invoke(app, ["label", str(src), "--state", str(d / "st[ate]"), "--out", str(d / "o.jsonl")])
    assert r.exit_code == 66 and "st[ate]: not a saved ICLClassifier" in r.output, r.output  # EX_NOINPUT
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  benchmark: sample\n  validation_size: null\nclassifier:\n  program: retriever_only\n  shortlist_k: 3\n")
    r = CliRunner().invoke(app, ["fit", str(cfg), "--out", str(d / "st")])
    assert r.exit_code == 0, r.output
    assert "'scores': [" in r.output and "runs[1]" in r.output, r.output


# -- an LM server killed mid-run, then restarted: the run stops, the re-run resumes ----------------------

STUB = Path(__file__).resolve().parent / "stub_openai_server.py"


def _start_stub(port: int, log: Path) -> subprocess.Popen:
    import sys

    proc = subprocess.Popen(
        [sys.executable, str(STUB), "--port", str(port), "--delay", "0.05", "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    line = proc.stdout.readline().decode()
    assert line.startswith("ready"), line
    return proc


def _kill(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_lm_server_killed_mid_run_stops_the_run_and_the_rerun_labels_every_row_once(tmp_path, banking):
    import os
    import subprocess
    import sys
    import time

    from iclcls.classifier import ICLClassifier
    from iclcls.label import EXIT_LM_UNAVAILABLE
    from iclcls.lm.server import free_port

    port = free_port()
    spec = f"openai:stub@http://127.0.0.1:{port}"
    log = tmp_path / "requests.log"
    server = _start_stub(port, log)
    try:
        clf = ICLClassifier(lm=ScriptedLM(), rank="generative", shots=1, shortlist_k=3)
        clf.fit(banking.train[:60], tune="none").save(tmp_path / "st")
        n = 40
        src = write_jsonl(tmp_path / "in.jsonl", [{"doc": f"d{i}", "text": ex.text} for i, ex in enumerate(banking.test[:n])])
        out = tmp_path / "out.jsonl"
        cmd = [sys.executable, "-m", "iclcls.cli", "label", str(src), "--state", str(tmp_path / "st"), "--out", str(out),
               "--lm", spec, "--id-field", "doc", "--chunk-rows", "4", "--quiet"]
        env = {**os.environ, "ICLCLS_API_KEY": "x"}
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 240
        while time.time() < deadline and run.poll() is None:  # kill the server once a few chunks are in
            if out.is_file() and len(out.read_bytes().splitlines()) >= 8:
                break
            time.sleep(0.05)
        _kill(server)
        text = run.communicate(timeout=240)[0].decode()
        rows = read_rows(out)
        assert run.returncode == EXIT_LM_UNAVAILABLE, text
        assert "LM server is unavailable" in " ".join(text.split()) and f"127.0.0.1:{port}" in text
        assert 8 <= len(rows) < n and not [r for r in rows if "error" in r]  # nothing for the unlabelled rows
        first = {r["id"] for r in rows}
        server = _start_stub(port, log)  # back on the same address: the same command resumes
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        rows = read_rows(out)
        assert [r["id"] for r in rows][: len(first)] == [f"d{i}" for i in range(len(first))]
        assert sorted(r["id"] for r in rows) == sorted(f"d{i}" for i in range(n))  # every row once
        assert all(r["labels"] for r in rows) and f"{len(first)} already in" in res.stderr + res.stdout
        print(f"\n[label] server killed after {len(first)} of {n} rows; the re-run labelled {n - len(first)}, none twice")
    finally:
        _kill(server)


def test_rows_are_strict_json(tmp_path):
    import io
    import math

    from iclcls.label.output import StdoutSink

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    buf = io.StringIO()
    StdoutSink(buf).write([{"id": 0, "labels": ["a", "b"], "scores": [0.5, -math.inf], "trace": {"x": math.nan}}])
    row = json.loads(buf.getvalue(), parse_constant=refuse)
    assert row["scores"] == [0.5, None] and row["trace"] == {"x": None}


def test_predict_and_fit_refuse_bad_text_naming_the_index(clf, banking):
    from iclcls import Example
    from iclcls.programs import retriever_only

    with pytest.raises(ValueError, match=r"input 1: contains a lone surrogate '\\ud800' at character 2"):
        clf.predict_detailed(["card lost", "ab\ud800cd"])
    with pytest.raises(ValueError, match="input 0: contains a NUL character at character 3"):
        clf.predict_detailed([Example("nul\x00byte")])
    train = list(banking.train[:30])
    with pytest.raises(ValueError, match="fit: example 2: contains a lone surrogate"):
        retriever_only().fit(train[:2] + [Example("x\udc80y", train[2].labels)] + train[3:])
    with pytest.raises(ValueError, match="fit: example 0 label 0: contains a NUL"):
        retriever_only().fit([Example(train[0].text, ("lab\x00el",))] + train[1:])
    assert clf.predict_detailed(["card lost"])[0].labels  # good text is untouched
