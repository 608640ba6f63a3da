"""What adding a class costs as the classifier grows: addition latency, and a concurrent client's.

    python eval/bench_additions.py [--classes 1000 10000 100000] [--additions 100] [--per-class 3]
        [--out eval/results/bench_additions.json]

For each size: a retriever-only classifier (ECL shortlist, kNN demonstrations, the retriever
ranks) fitted on ``classes`` synthetic classes of ``--per-class`` examples each, then
``--additions`` additions of one new class with ``--per-class`` examples, as the service makes
them: the examples are embedded first (outside any lock), then ``add_classes(...,
embeddings=...)`` runs under the write side of the service's readers-writer lock, while one
client thread classifies one text at a time under the read side. Reported: the addition's
p50/p99 (the time under the write lock), and the client's p99 latency while additions run
against the same client with no additions (the same number of requests).

Embeddings are precomputed (a lookup table of unit vectors: each class a random centre, each
example the centre plus noise), so the run measures the classifier, not the embedder. The ECL
re-whitens lazily (``rewhiten="deferred"``, its default); a re-whitening that an addition
triggers is counted in that addition's latency. Rows:
{"classes", "add_ms_p50", "add_ms_p99", "classify_p99_ms_idle", "classify_p99_ms_adding", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIM = 384


class TableEmbedder:
    """Precomputed unit vectors by text (the benchmark's stand-in for a real embedder)."""

    name = "bench-table"

    def __init__(self) -> None:
        self.table: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return DIM

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool | None = None) -> np.ndarray:
        return np.stack([self.table[t] for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def synth_class(emb: TableEmbedder, rng: np.random.Generator, name: str, n: int, noise: float = 0.6):
    from iclcls import Example

    centre = rng.standard_normal(DIM)
    examples = []
    for j in range(n):
        v = centre / np.linalg.norm(centre) + noise * rng.standard_normal(DIM) / np.sqrt(DIM)
        text = f"{name} example {j}"
        emb.table[text] = (v / np.linalg.norm(v)).astype(np.float32)
        examples.append(Example(text, (name,)))
    return examples


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000.0, q)), 3)


def client(clf, lock, texts: list[str], stop: threading.Event, out: list[float], limit: int) -> None:
    i = 0
    while not stop.is_set() and len(out) < limit:
        t = time.perf_counter()
        with lock.read():
            clf.predict_detailed([texts[i % len(texts)]], show_progress=False)
        out.append(time.perf_counter() - t)
        i += 1


def bench_size(n_classes: int, args) -> dict:
    from iclcls import ICLClassifier
    from iclcls.serve.rwlock import RWLock

    rng = np.random.default_rng(n_classes)
    emb = TableEmbedder()
    train = [ex for c in range(n_classes) for ex in synth_class(emb, rng, f"class{c}", args.per_class)]
    queries = []
    for c in rng.choice(n_classes, 200, replace=False):  # noisy copies of existing examples
        v = emb.table[f"class{c} example 0"] + 0.3 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        emb.table[f"query {c}"] = v / np.linalg.norm(v)
        queries.append(f"query {c}")
    new = [synth_class(emb, rng, f"new{a}", args.per_class) for a in range(args.additions)]
    t = time.perf_counter()
    clf = ICLClassifier(lm=None, embedder=emb, shortlist="ecl", shortlist_k=10, select="knn", shots=4,
                        rank="retriever", show_progress=False).fit(train, tune="none")
    fit_s = time.perf_counter() - t
    print(f"[{n_classes}] fitted in {fit_s:.1f} s", flush=True)
    lock = RWLock()
    clf.predict_detailed(queries[:8], show_progress=False)  # warm-up
    rewhitens = clf.shortlister_.rewhitens_
    # Concurrent client during the additions.
    adding: list[float] = []
    busy: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=client, args=(clf, lock, queries, stop, busy, 10**9))
    th.start()
    for examples in new:
        vecs = emb.encode([ex.text for ex in examples])  # outside the lock, as the service does
        t = time.perf_counter()
        with lock.write():
            clf.add_classes(examples, embeddings=vecs)
        adding.append(time.perf_counter() - t)
        time.sleep(args.gap_ms / 1000.0)
    stop.set()
    th.join()
    # The same client with no additions, for as many requests.
    idle: list[float] = []
    stop = threading.Event()
    client(clf, lock, queries, stop, idle, len(busy))
    assert all(f"new{a}" in clf.classes_ for a in (0, args.additions - 1))
    row = {
        "classes": n_classes, "examples": len(train), "additions": len(adding), "per_class": args.per_class,
        "add_ms_p50": pct(adding, 50), "add_ms_p99": pct(adding, 99), "add_ms_max": pct(adding, 100),
        "classify_p99_ms_idle": pct(idle, 99), "classify_p99_ms_adding": pct(busy, 99),
        "classify_p50_ms_idle": pct(idle, 50), "classify_p50_ms_adding": pct(busy, 50),
        "classify_requests": len(busy), "rewhitens_during_additions": clf.shortlister_.rewhitens_ - rewhitens,
        "fit_s": round(fit_s, 1),
    }
    row["classify_p99_ratio"] = round(row["classify_p99_ms_adding"] / max(row["classify_p99_ms_idle"], 1e-9), 3)
    print(f"[{n_classes}] " + json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--additions", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="pause between additions (the client runs meanwhile)")
    ap.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_additions.json")
    args = ap.parse_args()
    rows = []
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg()[0], "started": time.strftime("%F %T")}
    for n in args.classes:
        rows.append(bench_size(n, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"\n{'classes':>8} {'add p50':>9} {'add p99':>9} {'cls p99 idle':>13} {'cls p99 adding':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['classes']:>8} {r['add_ms_p50']:>9} {r['add_ms_p99']:>9} {r['classify_p99_ms_idle']:>13} "
              f"{r['classify_p99_ms_adding']:>15} {r['classify_p99_ratio']:>6}")
    if len(rows) > 1:
        print(f"add p50 at {rows[-1]['classes']} / at {rows[0]['classes']}: {rows[-1]['add_ms_p50'] / rows[0]['add_ms_p50']:.2f}")


if __name__ == "__main__":
    main()
