"""Property-based fuzzing (hypothesis): every input ends in a result or a documented error.

Targets: the file loaders (random bytes; round trips of hostile-but-valid files: quoting,
BOMs, CRLF, control characters, line separators, huge fields), ``ICLClassifier.predict``
on a retriever-only classifier (control characters, RTL, emoji, 1 MB strings, mixed
Example/str), the generative ranker's answer parser, the metrics and the state loader.
Documented errors: ``DataError``/``ValueError`` (bad data), ``TypeError`` (a non-text input).

CI runs few examples per property (``ICLCLS_FUZZ_EXAMPLES``, default 20); eval/bench_fuzz.py
runs the same properties with many more and records the counts. With ``ICLCLS_FUZZ_REPORT``
set, each property appends how many cases it ran to that file (for the benchmark).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iclcls import Example, ICLClassifier, Prediction
from iclcls.data import DataError, DataWarning, load_benchmark, load_examples

N = int(os.environ.get("ICLCLS_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize=N <= 50)
RAN: Counter[str] = Counter()
DOCUMENTED = (DataError, ValueError)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    path = os.environ.get("ICLCLS_FUZZ_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(RAN)) + "\n")


# -- strategies -----------------------------------------------------------------------------

HOSTILE = st.sampled_from(
    ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r", "\n", "\r\n", "\t", '"', "'", ",",
     "\\", "\x07", "\u202e", "\u200f", "\ufeff", "שלום", "مرحبا", "🙂", "👩\u200d👩\u200d👧", "e\u0301", "{", "}"]
)  # fmt: skip
# NUL is refused at every boundary (check_text: a clear error naming the input), so the texts that
# must survive every path hold every other hostile character but that one.
TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=12), HOSTILE), min_size=1, max_size=8).map("".join).map(
    lambda t: t.replace("\x00", "\x01")
).filter(lambda t: t.strip() != "")
LABEL = st.text(alphabet=st.characters(categories=["L", "N"], include_characters="_- "), min_size=1, max_size=12).map(
    str.strip
).filter(bool)
ROWS = st.lists(st.tuples(TEXT, LABEL), min_size=1, max_size=8)


def _ran(name: str) -> None:
    RAN[name] += 1


# -- file loaders ------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]))
def test_random_bytes_load_or_raise_a_data_error(tmp_path_factory, data, suffix):
    _ran("loaders.random_bytes")
    path = tmp_path_factory.mktemp("bytes") / f"f{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            out = load_examples(path)
        except DOCUMENTED:
            return
    assert all(isinstance(e, Example) and e.text.strip() and e.labels for e in out)


def _write_csv(path: Path, rows, *, sep: str, bom: bool, crlf: bool) -> None:
    buf = io.StringIO(newline="")
    # csv.writer leaves a bare "\r" unquoted under a "\n" terminator (an ambiguous file): quote all then.
    bare_cr = not crlf and any("\r" in t for t, _ in rows)
    w = csv.writer(buf, delimiter=sep, lineterminator="\r\n" if crlf else "\n",
                   quoting=csv.QUOTE_ALL if bare_cr else csv.QUOTE_MINIMAL)
    w.writerow(["text", "label"])
    w.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))


@FUZZ
@given(rows=ROWS, sep=st.sampled_from([",", "\t"]), bom=st.booleans(), crlf=st.booleans())
def test_csv_round_trip_keeps_every_row_exactly(tmp_path_factory, rows, sep, bom, crlf):
    _ran("loaders.csv_round_trip")
    path = tmp_path_factory.mktemp("csv") / ("f.csv" if sep == "," else "f.tsv")
    _write_csv(path, rows, sep=sep, bom=bom, crlf=crlf)
    out = load_examples(path)
    assert [(e.text, e.labels) for e in out] == [(t, (lab,)) for t, lab in rows]


@FUZZ
@given(rows=ROWS, bom=st.booleans(), crlf=st.booleans(), ascii_only=st.booleans())
def test_jsonl_round_trip_keeps_every_row_exactly(tmp_path_factory, rows, bom, crlf, ascii_only):
    _ran("loaders.jsonl_round_trip")
    path = tmp_path_factory.mktemp("jsonl") / "f.jsonl"
    nl = "\r\n" if crlf else "\n"
    body = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=ascii_only) + nl for t, lab in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    out = load_examples(path)
    assert [(e.text, e.labels) for e in out] == [(t, (lab,)) for t, lab in rows]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_huge_field_loads(tmp_path, suffix):
    big = "x" * 300_000 + ', "quoted"\n line'
    path = tmp_path / f"big{suffix}"
    if suffix == ".csv":
        _write_csv(path, [(big, "a"), ("small", "b")], sep=",", bom=False, crlf=False)
    else:
        path.write_text(json.dumps({"text": big, "label": "a"}) + "\n" + json.dumps({"text": "small", "label": "b"}) + "\n")
    out = load_examples(path)
    assert [e.text for e in out] == [big, "small"]


# -- predict on a retriever-only classifier ------------------------------------------------------


@pytest.fixture(scope="module")
def retriever():
    from iclcls.programs import retriever_only

    return retriever_only(shortlist_k=3).fit(load_benchmark("sample").train)


INPUT = st.one_of(TEXT, TEXT.map(lambda t: Example(t)), st.sampled_from(["", "   ", "\n\t"]))


@FUZZ
@given(inputs=st.lists(INPUT, min_size=0, max_size=6))
def test_predict_on_hostile_text(retriever, inputs):
    _ran("predict.hostile_text")
    try:
        preds = retriever.predict_detailed(inputs, show_progress=False)
    except ValueError as e:  # documented: an empty or whitespace input, named by position
        assert "is empty or whitespace" in str(e)
        assert any(isinstance(x, str) and not x.strip() for x in inputs)
        return
    assert len(preds) == len(inputs)
    for p in preds:
        assert isinstance(p, Prediction) and p.labels and set(p.labels) <= set(retriever.classes_)
        assert np.all(np.isfinite(p.scores))


def test_predict_on_megabyte_strings(retriever):
    _ran("predict.megabyte")
    big = ("I lost my card 🙂 \u202eedcba\u202c " * 40_000)[:1_000_000]
    preds = retriever.predict_detailed([big, Example(big + " \u2028 \x7f"), "fine"], show_progress=False)
    assert len(preds) == 3 and all(p.labels for p in preds)
    # A NUL (cut by C tokenizers and log readers) is refused at the boundary, naming the input.
    with pytest.raises(ValueError, match="input 1: contains a NUL character at character 1000000"):
        retriever.predict_detailed([big, Example(big + "\x00")], show_progress=False)


def test_predict_rejects_a_non_text_input_with_a_type_error(retriever):
    with pytest.raises(TypeError, match="input 1 must be a str or Example"):
        retriever.predict_detailed(["ok", 3])


# -- the generative ranker's parser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def parse_ctx(retriever):
    from iclcls.rank.base import RankContext

    return RankContext(None, [], [], [], retriever.builder_, retriever.pool_)


ANSWER = st.one_of(
    TEXT,
    st.lists(st.one_of(st.sampled_from(["card_lost", "Card Lost", "card lost.", " billing error", "`x`", ",", ";"]), TEXT),
             max_size=5).map(lambda xs: ", ".join(xs)),
    st.just(""),
)


@FUZZ
@given(answer=ANSWER, multi=st.booleans())
def test_generative_parser_maps_any_answer_to_known_labels(parse_ctx, answer, multi):
    from iclcls.rank.generative import GenerativeRanker

    _ran("generative.parser")
    mapped = GenerativeRanker(multi_label=multi).map_answer(answer, parse_ctx)
    labels = [lab for lab, _, _ in mapped]
    assert len(labels) == len(set(labels))
    assert set(labels) <= set(parse_ctx.pool.labels)
    for _, sim, how in mapped:
        assert how in ("exact", "case", "nearest") and math.isfinite(sim)


# -- metrics ------------------------------------------------------------------------------------------

GOLD = st.lists(st.lists(st.sampled_from("abcde"), max_size=3), min_size=0, max_size=6)


@FUZZ
@given(gold=GOLD, data=st.data(), k=st.integers(-1, 6))
def test_metrics_are_in_range_or_raise_value_error(gold, data, k):
    from iclcls import metrics

    _ran("metrics")
    n = len(gold) + data.draw(st.sampled_from([0, 0, 0, 1]))
    ranked = data.draw(st.lists(st.lists(st.sampled_from("abcdef"), max_size=6), min_size=n, max_size=n))
    try:
        out = metrics.compute_metrics(gold, ranked, ks=[k])
    except ValueError:
        assert n != len(gold) or not gold or any(not g for g in gold) or k < 1
        return
    for key, v in out.items():
        assert math.isfinite(v), key
        if key != "n" and key != "labels_per_prediction":
            assert 0.0 <= v <= 1.0, (key, v)


@FUZZ
@given(s=st.integers(-3, 30), n=st.integers(-3, 30))
def test_wilson_interval_is_an_interval_or_value_error(s, n):
    from iclcls.metrics import wilson_interval

    _ran("metrics.wilson")
    try:
        lo, hi = wilson_interval(s, n)
    except ValueError:
        assert n > 0 and not 0 <= s <= n
        return
    assert 0.0 <= lo <= hi <= 1.0


# -- the state loader: hostile text survives save/load -------------------------------------------------


@FUZZ
@given(rows=st.lists(st.tuples(TEXT, LABEL), min_size=2, max_size=5))
def test_state_round_trip_keeps_hostile_examples(tmp_path_factory, rows):
    from iclcls.programs import retriever_only

    _ran("state.round_trip")
    clf = retriever_only(shortlist_k=2).fit([Example(t, (lab,)) for t, lab in rows], tune="none")
    d = tmp_path_factory.mktemp("state") / "s"
    clf.save(d)
    again = ICLClassifier.load(d)
    assert [(e.text, e.labels) for e in again.pool_.examples] == [(t, (lab,)) for t, lab in rows]
