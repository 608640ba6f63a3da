"""Embedders on a CPU: speed against accuracy, per model and backend (which embedder for which job).

    .venv/bin/python eval/bench_embedders.py                       # accuracy, then speed
    .venv/bin/python eval/bench_embedders.py --part accuracy       # any time: results do not depend on load
    .venv/bin/python eval/bench_embedders.py --part speed label --wait-load 1.5 --wait-max 1200
    .venv/bin/python eval/bench_embedders.py --table               # the rows as a markdown table

Writes eval/results/bench_embedders.json: one row per embedder spec, the two parts merged
into the rows already there. Per row:

- ``sentences_per_s``: batches of 64 (sorted by length inside each embedder), 1,024 unique
  BANKING77 training texts, median of 3 rounds (each round times every embedder in turn);
  ``sentences_per_s_b1``: 256 texts one by one, likewise;
- ``load_s``: building the embedder and its runtime in a warm process (export already made);
  ``startup_s``: a fresh ``python`` process importing iclcls, loading the embedder and
  embedding one text (what a `label` or `serve` start pays);
- ``banking77_knn`` / ``clinc150_knn``: kNN-vote accuracy (%) of the retriever alone
  (``retriever_only(shortlist="knn_vote")``) with the 10-shot pools (train_10.csv), full test
  sets (3,080 / 4,500);
- ``esco_tech_rp10`` / ``esco_tech_r50``: ESCO TECH (338 test sentences, 13,896 skills)
  retrieve-only RP@10 and R@50 (%), the label retriever with the ESCO priors (A = 10), as
  eval/configs/esco_tech_retrieve.yaml;
- ``label_3080_s`` / ``embed_alone_3080_s`` / ``label_over_embed`` / ``label_startup_s``
  (``--label-embedders``): `iclcls label` retriever-only on BANKING77 test against the embedder
  alone on the same texts, fresh processes and empty caches (as eval/bench_label.py), and a
  1-row `label` (start-up);
- ``cosine_to_fp32``: mean (and ``cosine_to_fp32_min``) cosine of each BANKING77 test text's
  embedding to the same model's float32 PyTorch embedding.

All speed figures come from ONE process, back to back, so their ratios are comparable; the
1-minute load average before and after each embedder is recorded (2 cores shared with other
jobs: figures taken under load are not the machine's speed, the ratios are more robust).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results" / "bench_embedders.json"
DEFAULT_SPECS = ["minilm@torch", "minilm@onnx", "minilm@onnx-int8", "minilm@openvino", "minilm@openvino-int8", "minilm@static"]


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def data_dir() -> Path:
    for cand in (os.environ.get("ICLCLS_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set ICLCLS_DATA or put it at ../shared/data")


def speed_texts(n: int) -> list[str]:
    with open(data_dir() / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        texts = list(dict.fromkeys(row["text"] for row in csv.DictReader(f)))
    return texts[:n]


def reference_spec(spec: str) -> str:
    return spec.rpartition("@")[0] + "@torch" if "@" in spec else spec


# -- accuracy ------------------------------------------------------------------------------


def knn_accuracy(spec: str, dataset: str) -> float:
    from iclcls.data import load_benchmark
    from iclcls.programs import retriever_only

    bench = load_benchmark(f"{dataset}_10shot")
    clf = retriever_only(shortlist="knn_vote", embedder=spec, show_progress=False).fit(bench.train, tune="none")
    preds = clf.predict_detailed(bench.test, show_progress=False)
    return round(100 * float(np.mean([p.label == e.label for p, e in zip(preds, bench.test)])), 2)


def esco_tech(spec: str) -> dict[str, float]:
    from iclcls.data import load_benchmark
    from iclcls.metrics import recall_at_k, rp_at_k
    from iclcls.programs import retriever_only

    bench = load_benchmark("esco_tech")
    test = [ex for ex in bench.test if ex.labels]
    clf = retriever_only(
        shortlist={"name": "label_retriever", "priors": bench.priors, "prior_a": 10.0},
        shortlist_k=50, multi_label=True, embedder=spec, show_progress=False,
    ).fit([], labels=bench.labels, tune="none")  # fmt: skip
    preds = clf.predict_detailed(test, show_progress=False)
    gold, ranked = [list(ex.labels) for ex in test], [list(p.labels) for p in preds]
    return {"esco_tech_rp10": round(100 * rp_at_k(gold, ranked, 10), 2), "esco_tech_r50": round(100 * recall_at_k(gold, ranked, 50), 2), "esco_tech_n": len(test)}


def cosine_to_reference(spec: str) -> dict[str, float]:
    from iclcls.data import load_benchmark
    from iclcls.embed import get_embedder

    texts = [ex.text for ex in load_benchmark("banking77_10shot").test]
    ref = get_embedder(reference_spec(spec)).encode(texts)
    vecs = get_embedder(spec).encode(texts)
    if vecs.shape != ref.shape:  # a static model has its own dimensions: no per-vector comparison
        return {"cosine_to_fp32": None, "cosine_to_fp32_min": None}
    cos = (vecs * ref).sum(1)
    return {"cosine_to_fp32": round(float(cos.mean()), 5), "cosine_to_fp32_min": round(float(cos.min()), 5)}


def accuracy_part(specs: list[str], log=print) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for spec in specs:
        t = time.perf_counter()
        row = {"banking77_knn": knn_accuracy(spec, "banking77"), "clinc150_knn": knn_accuracy(spec, "clinc150")}
        row |= esco_tech(spec)
        row |= cosine_to_reference(spec)
        row["accuracy_wall_s"] = round(time.perf_counter() - t, 1)
        rows[spec] = row
        log(f"{spec:24s} {row}")
    return rows


# -- speed ---------------------------------------------------------------------------------


def fresh_embedder(spec: str):
    """A new (uncached, not memoised) embedder for ``spec``, so its load can be timed."""
    from iclcls import embed
    from iclcls.embed.specs import parse_backend_spec

    parsed = parse_backend_spec(spec)
    folder, base = embed._model_folder(parsed.model)
    if parsed.backend == "torch":
        return embed.SentenceTransformerEmbedder(folder, name=base)
    return embed._exported.__wrapped__(str(folder), parsed.backend, f"{base}@{parsed.backend}")


def startup_seconds(spec: str) -> float:
    """Wall time of a fresh process that imports iclcls, loads ``spec`` and embeds one text."""
    code = f"from iclcls.embed import get_embedder; get_embedder({spec!r}, cache=False).encode(['start'])"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
    return round(time.perf_counter() - t, 2)


def speed_part(specs: list[str], *, n: int, n_b1: int, rounds: int = 3, log=print) -> dict[str, dict]:
    """Every embedder loaded, then ``rounds`` rounds each timing every embedder once in turn
    (batch 64, then batch 1): the median per embedder. Interleaving keeps the ratios fair when
    other jobs' load comes and goes during the run."""
    texts = speed_texts(n)
    embedders, rows = {}, {}
    for spec in specs:
        t = time.perf_counter()
        emb = fresh_embedder(spec)
        emb.encode(["warm up"])  # loads the runtime (torch: the model; others: tokenizer + session)
        rows[spec] = {"load_s": round(time.perf_counter() - t, 2)}
        emb.encode(texts[:128], batch_size=64)
        embedders[spec] = emb
    b64: dict[str, list[float]] = {s: [] for s in specs}
    b1: dict[str, list[float]] = {s: [] for s in specs}
    loads = [load_now()]
    for r in range(rounds):
        for spec, emb in embedders.items():
            t = time.perf_counter()
            emb.encode(texts, batch_size=64)
            b64[spec].append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for text in texts[:n_b1]:
                emb.encode([text], batch_size=1)
            b1[spec].append(n_b1 / (time.perf_counter() - t))
        loads.append(load_now())
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{s} {b64[s][-1]:.0f}/s" for s in specs) + f" (load {loads[-1]})")
    for spec in specs:
        rows[spec] |= {
            "sentences_per_s": round(statistics.median(b64[spec]), 1),
            "sentences_per_s_b1": round(statistics.median(b1[spec]), 1),
            "sentences_per_s_rounds": [round(x, 1) for x in b64[spec]],
            "startup_s": startup_seconds(spec),
            "speed_load_avg_1m": loads,
        }
        log(f"{spec:24s} {rows[spec]}")
    return rows


def _timed_process(cmd: list[str], cache: Path) -> float:
    """Wall seconds of ``cmd`` in a fresh process with an empty embedding cache."""
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ICLCLS_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    return round(time.perf_counter() - t, 2)


def label_part(specs: list[str], *, work: Path, log=print) -> dict[str, dict]:
    """`iclcls label` retriever-only on BANKING77 test (3,080 rows) against the embedder alone on
    the same texts, both fresh processes with empty caches (start-up included), as
    eval/bench_label.py measures them; and the start-up alone (a 1-row file)."""
    from iclcls.data import load_benchmark
    from iclcls.programs import retriever_only

    bench = load_benchmark("banking77_10shot")
    texts = [ex.text for ex in bench.test]
    src, one = work / "test.jsonl", work / "one.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    one.write_text(json.dumps({"text": texts[0]}) + "\n")
    rows: dict[str, dict] = {}
    for i, spec in enumerate(specs):
        state = work / f"state{i}"
        retriever_only(shortlist_k=10, embedder=spec).fit(bench.train).save(state)
        label = [sys.executable, "-m", "iclcls.cli", "label", "--state", str(state), "--quiet", "--out"]
        embed = [sys.executable, "-c", "import json, sys; from iclcls.embed import get_embedder; "
                 f"get_embedder({spec!r}, cache=False).encode([json.loads(l)['text'] for l in open(sys.argv[1])])", str(src)]  # fmt: skip
        load0 = load_now()
        startup = _timed_process([*label, str(work / f"one{i}.jsonl"), str(one)], work / f"c{i}a")
        label_s = _timed_process([*label, str(work / f"out{i}.jsonl"), str(src)], work / f"c{i}b")
        embed_s = _timed_process(embed, work / f"c{i}c")
        rows[spec] = {"label_3080_s": label_s, "embed_alone_3080_s": embed_s, "label_over_embed": round(label_s / embed_s, 2),
                      "label_startup_s": startup, "label_load_avg_1m": [load0, load_now()]}  # fmt: skip
        log(f"{spec:24s} {rows[spec]}")
    return rows


def wait_for_quiet(limit: float, max_wait: float, log=print) -> float:
    """Poll the 1-minute load average until it is below ``limit`` (or ``max_wait`` seconds pass)."""
    t0 = time.time()
    while (now := load_now()) >= limit and time.time() - t0 < max_wait:
        log(f"load average {now} >= {limit}; waiting ({int(time.time() - t0)} s)")
        time.sleep(30)
    return now


# -- main ----------------------------------------------------------------------------------


def markdown_table(doc: dict) -> str:
    """The rows as the README's table (None -> "-")."""
    cols = [("embedder", "spec"), ("sentences_per_s", "texts/s b64"), ("speedup_vs_torch_b64", "x torch"),
            ("sentences_per_s_b1", "texts/s b1"), ("load_s", "load s"), ("startup_s", "start-up s"),
            ("banking77_knn", "BANKING77 kNN"), ("clinc150_knn", "CLINC150 kNN"), ("esco_tech_rp10", "TECH RP@10"),
            ("esco_tech_r50", "TECH R@50"), ("cosine_to_fp32", "cos mean"), ("cosine_to_fp32_min", "cos min")]  # fmt: skip
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for row in doc.get("rows", []):
        cells = [f"`{row[k]}`" if k == "embedder" else ("-" if row.get(k) is None else str(row[k])) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", nargs="+", choices=["all", "accuracy", "speed", "label"], default=["all"],
                    help="all = accuracy, then speed and label in one quiet window")
    ap.add_argument("--label-embedders", nargs="+", default=["minilm@torch", "minilm@onnx-int8", "minilm@openvino-int8"])
    ap.add_argument("--embedders", nargs="+", default=DEFAULT_SPECS, help="embedder specs (model@backend)")
    ap.add_argument("--sentences", type=int, default=1024, help="texts per batch-64 pass")
    ap.add_argument("--sentences-b1", type=int, default=256, help="texts embedded one at a time")
    ap.add_argument("--wait-load", type=float, default=1.5, help="start the speed part below this 1-min load average")
    ap.add_argument("--wait-max", type=float, default=1200, help="seconds to wait for that, at most")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print --out's rows as a markdown table and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return {}

    from iclcls.embed.export import ensure_export
    from iclcls.embed.source import describe
    from iclcls.embed.specs import parse_backend_spec
    from iclcls.io import atomic_write_json

    for spec in args.embedders:  # exports are made before anything is timed
        parsed = parse_backend_spec(spec)
        if parsed is None:
            raise SystemExit(f"{spec!r}: give specs as model@backend (e.g. minilm@torch)")
        if parsed.backend != "torch":
            from iclcls import embed

            ensure_export(describe(embed._model_folder(parsed.model)[0]), parsed.backend)

    out_path = Path(args.out)
    doc = json.loads(out_path.read_text()) if out_path.is_file() else {}
    rows = {r["embedder"]: r for r in doc.get("rows", [])}
    doc.setdefault("machine", f"{os.cpu_count()} CPU cores shared with other jobs, no GPU")
    doc["units"] = {"knn, rp10, r50": "percent", "sentences_per_s": "texts/s", "*_s": "seconds"}
    command = "python eval/bench_embedders.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def merge(new_rows: dict[str, dict]) -> None:  # and save: a stopped run keeps its finished parts
        for spec, row in new_rows.items():
            rows.setdefault(spec, {"embedder": spec, "backend": parse_backend_spec(spec).backend}).update(row)
        ref = {s: r.get("sentences_per_s") for s, r in rows.items() if s.endswith("@torch")}
        for spec, row in rows.items():
            base = ref.get(reference_spec(spec))
            if base and row.get("sentences_per_s"):
                row["speedup_vs_torch_b64"] = round(row["sentences_per_s"] / base, 2)
        doc["rows"] = list(rows.values())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, doc)

    parts = {"accuracy", "speed", "label"} if "all" in args.part else set(args.part)
    if "accuracy" in parts:
        doc["accuracy_command"] = command
        merge(accuracy_part(args.embedders))
    if parts & {"speed", "label"}:
        before = wait_for_quiet(args.wait_load, args.wait_max)
        doc["speed"] = {"load_avg_1m_at_start": before, "waited_for_below": args.wait_load, "command": command,
                        "threads": "each runtime's default (torch: 2, onnxruntime: physical cores, OpenVINO: LATENCY hint)"}  # fmt: skip
    if "speed" in parts:
        merge(speed_part(args.embedders, n=args.sentences, n_b1=args.sentences_b1))
    if "label" in parts:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench_embedders.") as work:
            merge(label_part(args.label_embedders, work=Path(work)))
    if parts & {"speed", "label"}:
        doc["speed"]["load_avg_1m_at_end"] = load_now()
        merge({})
    print(f"wrote {out_path}")
    return doc


if __name__ == "__main__":
    main()
