"""The data layer: named benchmarks against the real data, file loaders, bad input, splits."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest

import iclcls
from iclcls.data import (
    BENCHMARKS,
    Benchmark,
    DataError,
    class_incremental_tasks,
    filter_by_labels,
    load_benchmark,
    load_examples,
    load_hf_dataset,
    resolve_data_dir,
)
from iclcls.errors import DataWarning
from iclcls.types import Example, LabelSpace

# name: (train, validation, test, labels), from ../shared/data/README.md
COUNTS = {
    "banking77": (10003, 0, 3080, 77),
    "banking77_dialoglue": (8622, 1540, 3080, 77),
    "banking77_10shot": (770, 1540, 3080, 77),
    "banking77_5shot": (385, 1540, 3080, 77),
    "clinc150": (15000, 3000, 4500, 150),
    "clinc150_oos": (15100, 3100, 5500, 151),
    "clinc150_dialoglue": (15000, 3000, 4500, 150),
    "clinc150_10shot": (1500, 3000, 4500, 150),
    "clinc150_5shot": (750, 3000, 4500, 150),
    "banking77_klda": (10003, 0, 1000, 77),
    "clinc150_klda": (10500, 0, 750, 150),
    "goemotions": (43410, 5426, 5427, 28),
    "esco_tech": (0, 75, 338, 13896),
    "esco_house": (0, 61, 262, 13896),
    "sample": (64, 0, 24, 8),
}


def test_every_benchmark_is_listed():
    assert set(BENCHMARKS) == set(COUNTS)


# ---- named benchmarks on the real data ---------------------------------------------


@pytest.mark.parametrize("name", [n for n in COUNTS if n != "sample"])
def test_benchmark_counts_and_labels(name, data_dir):
    bench = load_benchmark(name, data_dir=data_dir)
    assert isinstance(bench, Benchmark) and bench.name == name
    train, val, test, n_labels = COUNTS[name]
    assert (len(bench.train), len(bench.validation), len(bench.test), len(bench.labels)) == (train, val, test, n_labels)
    d = bench.describe()
    assert (d["train"], d["validation"], d["test"], d["labels"]) == (train, val, test, n_labels)
    for split in ("train", "validation", "test"):
        for ex in bench.split(split):
            assert ex.labels and ex.text.strip()
            assert all(lab in bench.labels for lab in ex.labels), (split, ex)
    if not bench.multi_label:
        assert all(len(ex.labels) == 1 for ex in bench.train + bench.validation + bench.test)
    ids = [ex.id for ex in bench.train + bench.validation + bench.test]
    assert None not in ids and len(set(ids)) == len(ids)


def test_banking77_is_the_original_release(data_dir):
    bench = load_benchmark("banking77", data_dir=data_dir)
    cats = json.loads((data_dir / "banking77" / "categories.json").read_text())
    assert bench.labels.labels == tuple(cats)
    assert bench.validation == []
    assert bench.train[0] == Example("I am still waiting on my card?", ("card_arrival",), id="banking77/train.csv:2")
    assert set(Counter(ex.label for ex in bench.test).values()) == {40}  # 40 test queries per intent


def test_few_shot_splits_have_k_per_class(data_dir):
    for name, k in (("banking77_10shot", 10), ("banking77_5shot", 5), ("clinc150_10shot", 10), ("clinc150_5shot", 5)):
        bench = load_benchmark(name, data_dir=data_dir)
        assert set(Counter(ex.label for ex in bench.train).values()) == {k}, name


def test_clinc150_oos(data_dir):
    plain = load_benchmark("clinc150", data_dir=data_dir)
    oos = load_benchmark("clinc150_oos", data_dir=data_dir)
    assert "oos" not in plain.labels and oos.labels[-1] == "oos"
    assert list(oos.labels)[:150] == list(plain.labels)
    n = {s: sum(ex.label == "oos" for ex in oos.split(s)) for s in ("train", "validation", "test")}
    assert n == {"train": 100, "validation": 100, "test": 1000}
    assert Counter(ex.label for ex in plain.train).most_common(1)[0][1] == 100


def test_klda_labels_map_back_to_names(data_dir):
    klda = load_benchmark("banking77_klda", data_dir=data_dir)
    orig = load_benchmark("banking77", data_dir=data_dir)
    assert list(klda.labels) == sorted(orig.labels, key=str.lower)
    assert [(e.text, e.label) for e in klda.train] == [(e.text, e.label) for e in orig.train]
    test_gold = {e.text: e.label for e in orig.test}
    assert all(test_gold[e.text] == e.label for e in klda.test)
    clinc = load_benchmark("clinc150_klda", data_dir=data_dir)
    assert set(clinc.labels) == set(load_benchmark("clinc150_5shot", data_dir=data_dir).labels)


def test_goemotions(data_dir):
    bench = load_benchmark("goemotions", data_dir=data_dir)
    names = (data_dir / "goemotions" / "labels.txt").read_text().split()
    assert bench.multi_label and bench.labels.labels == tuple(names)
    assert bench.labels[0] == "admiration" and bench.labels[27] == "neutral"
    first = bench.train[0]
    assert first.text == "My favourite food is anything I didn't have to cook myself."
    assert first.labels == ("neutral",) and first.id == "eebbqej"
    multi = sum(len(e.labels) > 1 for e in bench.train) / len(bench.train)
    assert 0.15 < multi < 0.18  # "about 16% of rows have several"


@pytest.fixture(scope="module")
def esco(data_dir):
    return load_benchmark("esco_tech", data_dir=data_dir), load_benchmark("esco_house", data_dir=data_dir)


def test_esco_tech_and_house(esco):
    tech, house = esco
    assert tech.multi_label and tech.train == []
    assert len(tech.test) == 338 and len(house.test) == 262
    avg = sum(len(e.labels) for e in tech.test) / len(tech.test)
    assert avg == pytest.approx(1.72, abs=0.005)
    d = tech.describe()
    assert d["labels_per_example"]["test"] == pytest.approx(1.72, abs=0.005)
    assert d["source_rows"] == {"validation": 293, "test": 1164}  # README row counts
    assert house.info["source_rows"] == {"validation": 231, "test": 891}
    assert d["sentences"]["test"] - d["dropped_unlabelled_sentences"]["test"] == 338
    assert tech.info["dropped_unlabelled_sentences"] == {"validation": 26, "test": 87}
    assert house.info["dropped_unlabelled_sentences"] == {"validation": 16, "test": 64}
    for bench in esco:
        for ex in bench.validation + bench.test:
            assert "LABEL NOT PRESENT" not in ex.labels and "UNDERSPECIFIED" not in ex.labels
            assert len(set(ex.labels)) == len(ex.labels)
    first = tech.test[0]
    assert first.text == "django postgresql redis" and first.labels == ("PostgreSQL",)


def test_esco_label_variants_are_remapped_not_added(esco, data_dir):
    tech, house = esco
    raw = (data_dir / "esco_skills" / "skills_en_label.txt").read_bytes().decode("utf-8").split("\r\n")
    assert len(raw) == 13896 and tech.labels.labels == tuple(raw)  # verbatim, file order
    # the annotations spell two skills differently from the label file: matched, counted
    assert tech.info["remapped_labels"] == {
        "data extraction, transformation and loading tools": "data extraction transformation and loading tools"
    }
    assert tech.info["remapped_label_rows"] == 3  # rows (two sentences)
    assert house.info["remapped_labels"] == {"plan ": "plan"} and house.info["remapped_label_rows"] == 1
    assert tech.info["added_labels"] == [] and house.info["added_labels"] == []


def test_esco_priors(esco):
    tech, _ = esco
    assert tech.priors is not None and len(tech.priors) == 5295
    assert all(lab in tech.labels for lab in tech.priors)
    assert tech.priors["plan"] == pytest.approx(0.4249781776051786)  # stored as "plan " in the file
    assert tech.priors["statistics"] == pytest.approx(0.615401215655774)
    assert tech.info["priors_dropped"] == 0


def test_cli_data_banking77(data_dir):
    from typer.testing import CliRunner

    from iclcls.cli import app

    result = CliRunner().invoke(app, ["data", "banking77", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"train": 10003, "validation": 0, "test": 3080, "labels": 77}


# ---- data folder resolution --------------------------------------------------------


def test_resolve_data_dir_order(tmp_path, monkeypatch, data_dir):
    given = tmp_path / "given"
    given.mkdir()
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("ICLCLS_DATA", str(env))
    assert resolve_data_dir(given) == given
    assert resolve_data_dir() == env
    monkeypatch.setenv("ICLCLS_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="ICLCLS_DATA") as e:
        resolve_data_dir()
    assert "missing" in str(e.value)
    with pytest.raises(DataError, match="data_dir"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.delenv("ICLCLS_DATA")
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()  # ../shared/data from cwd


def test_resolve_data_dir_none_found(tmp_path, monkeypatch):
    monkeypatch.delenv("ICLCLS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(iclcls, "__file__", str(tmp_path / "a" / "b" / "iclcls" / "__init__.py"))
    with pytest.raises(DataError, match="no benchmark data directory") as e:
        resolve_data_dir()
    assert "ICLCLS_DATA" in str(e.value) and "data_dir" in str(e.value)
    with pytest.raises(DataError):
        load_benchmark("banking77")


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(DataError, match="banking77") as e:
        load_benchmark("banking78")
    assert "unknown benchmark 'banking78'" in str(e.value)


def _fake_banking(tmp_path: Path, data_dir: Path, train_csv: str) -> Path:
    root = tmp_path / "data"
    (root / "banking77").mkdir(parents=True)
    shutil.copy(data_dir / "banking77" / "categories.json", root / "banking77")
    (root / "banking77" / "train.csv").write_text(train_csv, encoding="utf-8")
    shutil.copy(data_dir / "banking77" / "test.csv", root / "banking77")
    return root


def test_benchmark_unknown_label_names_file_line_field(tmp_path, data_dir):
    root = _fake_banking(tmp_path, data_dir, 'text,category\nwhere is my card,card_arrival\n"two\nlines",card_arrival\nhi,not_an_intent\n')
    with pytest.raises(DataError) as e:
        load_benchmark("banking77", data_dir=root)
    msg = str(e.value)
    assert "train.csv" in msg and "line 5" in msg and "'category'" in msg and "not_an_intent" in msg


def test_benchmark_missing_file(tmp_path, data_dir):
    root = _fake_banking(tmp_path, data_dir, "text,category\nx,card_arrival\n")
    (root / "banking77" / "test.csv").unlink()
    with pytest.raises(DataError, match="not found") as e:
        load_benchmark("banking77", data_dir=root)
    assert "test.csv" in str(e.value)
    with pytest.raises(DataError, match="'goemotions' is missing"):
        load_benchmark("goemotions", data_dir=root)


# ---- the shipped sample -------------------------------------------------------------


def test_sample_needs_no_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ICLCLS_DATA", str(tmp_path / "does-not-exist"))
    bench = load_benchmark("sample")
    assert (len(bench.train), len(bench.test), len(bench.labels)) == (64, 24, 8)
    assert set(Counter(e.label for e in bench.train).values()) == {8}
    assert set(Counter(e.label for e in bench.test).values()) == {3}
    assert {"card_lost", "refund_request", "change_address"} <= set(bench.labels)
    assert not {e.text for e in bench.train} & {e.text for e in bench.test}
    readme = (Path(iclcls.__file__).parent / "data" / "sample" / "README.md").read_text()
    assert "hand-written" in readme


def test_sample_is_not_copied_from_shared_data(data_dir):
    texts = {e.text for e in load_benchmark("sample").train + load_benchmark("sample").test}
    bank = load_benchmark("banking77", data_dir=data_dir)
    assert not texts & {e.text for e in bank.train + bank.test}


# ---- user files, every format ---------------------------------------------------------


def test_load_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,text,label\n7,hello there,greet\n8,"a, quoted\ntext",NA\n9,007,1\n', encoding="utf-8")
    exs = load_examples(p, id_field="id")
    assert [(e.id, e.text, e.labels) for e in exs] == [
        ("7", "hello there", ("greet",)),
        ("8", "a, quoted\ntext", ("NA",)),  # "NA" stays a label, not a missing value
        ("9", "007", ("1",)),  # no number parsing
    ]


def test_load_tsv_multi_label_sep_and_format_override(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("sentence\ttags\nbook a table for two\tfood| booking\nplay jazz\tmusic\n", encoding="utf-8")
    exs = load_examples(p, text_field="sentence", label_field="tags", multi_label_sep="|")
    assert [e.labels for e in exs] == [("food", "booking"), ("music",)]
    q = tmp_path / "d.txt"
    q.write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_examples(q, format="tsv", text_field="sentence", label_field="tags")[1].labels == ("music",)
    with pytest.raises(DataError, match="format"):
        load_examples(q)


def test_load_jsonl_with_list_and_string_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "x", "label": ["a", "b"]}\n\n{"text": "y", "label": "c"}\n', encoding="utf-8")
    exs = load_examples(p)
    assert [e.labels for e in exs] == [("a", "b"), ("c",)]


def test_load_json_array_and_field(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "x", "label": 3}, {"text": "y", "label": 4}]), encoding="utf-8")
    assert [e.labels for e in load_examples(p)] == [("3",), ("4",)]
    q = tmp_path / "nested.json"
    q.write_text(json.dumps({"data": [{"q": "hi", "y": ["a"]}]}), encoding="utf-8")
    exs = load_examples(q, text_field="q", label_field="y", json_field="data")
    assert exs == [Example("hi", ("a",))]


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": [["a"], ["a", "b"]], "uid": [10, 11]}), p)
    exs = load_examples(p, id_field="uid")
    assert [(e.id, e.labels) for e in exs] == [("10", ("a",)), ("11", ("a", "b"))]
    pq.write_table(pa.table({"text": ["one", "  "], "label": ["a", "b"]}), p)
    with pytest.raises(DataError, match="row 2") as e:
        load_examples(p)
    assert "'text'" in str(e.value)


def test_unlabelled_load(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello\n", encoding="utf-8")
    assert load_examples(p, label_field=None) == [Example("hello")]


# ---- bad input: errors name file, line and field -------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        load_examples(tmp_path / "nope.csv")
    assert "nope.csv" in str(e.value)


def test_missing_column_lists_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("utterance,intent\nhi,greet\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "d.csv" in msg and "'text'" in msg and "'utterance'" in msg and "'intent'" in msg


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_text_names_line_and_field(tmp_path, bad):
    p = tmp_path / "d.csv"
    # header = line 1; the quoted text spans lines 2-3, so the bad row is on line 5
    p.write_text(f'text,label\n"first\nrow",a\nok,a\n{bad},b\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "d.csv" in msg and "line 5" in msg and "'text'" in msg and "empty" in msg


def test_empty_label_is_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert "line 2" in str(e.value) and "'label'" in str(e.value)


def test_on_empty_skip_counts(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nok,a\n ,a\nfine,b\n,b\nalso fine,\n", encoding="utf-8")
    with pytest.warns(DataWarning, match="skipped 3 rows") as w:
        exs = load_examples(p, on_empty="skip")
    assert [e.text for e in exs] == ["ok", "fine"]
    msg = str(w[0].message)
    assert "2 with empty text (line 3, line 5)" in msg and "1 with empty label (line 6)" in msg


def test_unknown_label_error_and_skip(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "zz"]}\n{"text": "c", "label": "y"}\n', encoding="utf-8")
    space = LabelSpace(["x", "y"])
    with pytest.raises(DataError) as e:
        load_examples(p, labels=space)
    msg = str(e.value)
    assert "d.jsonl" in msg and "line 2" in msg and "'label'" in msg and "'zz'" in msg
    with pytest.warns(DataWarning, match="1 with unknown label"):
        exs = load_examples(p, labels=["x", "y"], on_unknown_label="skip")
    assert [e.text for e in exs] == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_examples(p)) == 3  # no label space: every label is fine


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\ncaf\xc3\xa9,a\nna\xefve,b\n")  # line 3 is Latin-1
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "d.csv" in msg and "line 3" in msg and "UTF-8" in msg


def test_invalid_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", \n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert "line 2" in str(e.value) and "JSON" in str(e.value)


def test_ragged_csv_names_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\nb,x,extra,more\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert "line 3" in str(e.value)


def test_bad_option_values(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="on_empty"):
        load_examples(p, on_empty="ignore")


# ---- Hugging Face Hub: fail fast and clearly here -----------------------------------


def test_hf_dataset_offline_env_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_hf_dataset("iclcls-test/definitely-not-cached", split="train")
    msg = str(e.value)
    assert "unreachable" in msg and "local file" in msg


def test_hf_dataset_unreachable_endpoint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(DataError, match="unreachable") as e:
        load_hf_dataset("banking77", split="train", timeout=2.0)
    assert "local file" in str(e.value)


# ---- class-incremental splits --------------------------------------------------------


def test_class_incremental_tasks():
    labels = LabelSpace([f"c{i}" for i in range(10)])
    tasks = class_incremental_tasks(labels, n_tasks=3, seed=0)
    assert [len(t) for t in tasks] == [4, 3, 3]
    assert sorted(sum(tasks, [])) == sorted(labels)
    assert tasks == class_incremental_tasks(list(labels), n_tasks=3, seed=0)
    assert tasks != class_incremental_tasks(labels, n_tasks=3, seed=1)
    assert sum(tasks, []) != list(labels)  # shuffled
    with pytest.raises(ValueError):
        class_incremental_tasks(labels, n_tasks=11)
    with pytest.raises(ValueError):
        class_incremental_tasks(labels, n_tasks=0)


def test_filter_by_labels():
    exs = [Example("a", ("x",)), Example("b", ("y",)), Example("c", ("x", "z")), Example("d")]
    assert [e.text for e in filter_by_labels(exs, ["x"])] == ["a"]
    assert [e.text for e in filter_by_labels(exs, {"x", "z"})] == ["a", "c"]


def test_class_incremental_on_clinc(data_dir):
    bench = load_benchmark("clinc150_10shot", data_dir=data_dir)
    tasks = class_incremental_tasks(bench.labels, n_tasks=15, seed=0)
    assert all(len(t) == 10 for t in tasks)
    per_task = [filter_by_labels(bench.train, t) for t in tasks]
    assert [len(x) for x in per_task] == [100] * 15
    seen = tasks[0] + tasks[1]
    assert len(filter_by_labels(bench.test, seen)) == 20 * 30  # 30 test queries per intent

