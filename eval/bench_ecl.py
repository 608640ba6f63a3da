"""Speed of the Gaussian ECL shortlist at 10^3, 10^4, 10^5 synthetic classes (d=384).

    .venv/bin/python eval/bench_ecl.py [--sizes 1000 10000 100000] [--per-class 3]

Prints a table and writes eval/results/bench_ecl.json: one row per size with
``classes``, ``query_ms`` (per query, a batch of queries in one search), ``add_class_ms``
(adding one new class with ``rewhiten="deferred"``: statistics + whitening of its mean with
the current W + one index insert), and also the single-query latency, the time of a full
re-whitening (what ``rewhiten="eager"`` pays on every update), and the index's recall@5
against exact Mahalanobis search.

Synthetic data: class means on a 32-dimensional subspace plus small isotropic noise (like
sentence embeddings, low intrinsic dimension), examples = mean + noise with one shared
random covariance. The benchmarks run on vectors directly (text embeddings, not LLM tags).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _threads() -> str:
    """``--threads N`` (default 1), read before numpy loads: BLAS and faiss size their pools at import.

    One thread by default: on a shared, oversubscribed machine OpenMP/BLAS threads spin and
    make small searches 100x slower; one thread measures the algorithm, not the contention.
    """
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads()

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results" / "bench_ecl.json"
DIM = 384


def synthetic(n_classes: int, per_class: int, rng: np.random.Generator, mix: np.ndarray, basis: np.ndarray):
    """Examples (n_classes * per_class, DIM) and their class ids, generated chunk by chunk."""
    z = rng.standard_normal((n_classes, basis.shape[0])).astype(np.float32)
    means = z @ basis + 0.05 * rng.standard_normal((n_classes, DIM)).astype(np.float32)
    for start in range(0, n_classes, 10_000):
        m = means[start : start + 10_000]
        y = np.repeat(np.arange(start, start + len(m)), per_class)
        noise = rng.standard_normal((len(y), DIM)).astype(np.float32) @ mix
        yield m[y - start] + noise, y


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench_size(n_classes: int, *, per_class: int, queries: int, adds: int, eager_repeat: int, seed: int) -> dict:
    from iclcls.shortlist.ecl import GaussianECL

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((32, DIM)).astype(np.float32) / np.sqrt(32)
    mix = (0.3 * rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    ecl = GaussianECL(rewhiten="deferred")
    ecl.reset(DIM)
    t0 = time.perf_counter()
    for x, y in synthetic(n_classes, per_class, rng, mix, basis):
        ecl.stats_.add(x, y)
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ecl.rewhiten_all()
    build_s = time.perf_counter() - t0
    # Queries: noisy copies of random class means.
    qc = rng.integers(0, n_classes, size=queries)
    q = ecl.stats_.means(qc) + rng.standard_normal((queries, DIM)) @ mix
    ecl.search_vectors(q[:8], 5)  # warm up
    batch_s, _ = timed(lambda: ecl.search_vectors(q, 5), repeat=3)
    single = []
    for i in range(min(200, queries)):
        t = time.perf_counter()
        ecl.search_vectors(q[i : i + 1], 5)
        single.append(time.perf_counter() - t)
    # Recall of the index against exact Mahalanobis top-5 (brute force on whitened means).
    _, got = ecl.search_vectors(q[:200], 5)
    wm = ecl._whiten(ecl.stats_.means())
    wq = ecl._whiten(q[:200])
    d2 = (wq**2).sum(1)[:, None] - 2 * wq @ wm.T + (wm**2).sum(1)[None, :]
    exact = np.argsort(d2, axis=1)[:, :5]
    recall = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact)]))
    top1_ok = float(np.mean(got[:, 0] == qc[:200]))
    # Adding one new class (deferred: no re-whitening of the others).
    add_times = []
    for j in range(adds):
        cid = n_classes + j
        x = rng.standard_normal((1, 32)).astype(np.float32) @ basis + rng.standard_normal((per_class, DIM)).astype(np.float32) @ mix
        t = time.perf_counter()
        ecl.add_vectors(x, np.full(per_class, cid))
        add_times.append(time.perf_counter() - t)
    forced = ecl.rewhitens_ - 1
    # Where the time of one deferred add goes: statistics + drift check, then whitening + index insert.
    t_stats, t_upsert = [], []
    for j in range(adds):
        cid = n_classes + adds + 1000 + j
        x = rng.standard_normal((1, 32)).astype(np.float32) @ basis + rng.standard_normal((per_class, DIM)).astype(np.float32) @ mix
        t = time.perf_counter()
        touched = ecl.stats_.add(x, np.full(per_class, cid))
        ecl.drift()
        t1 = time.perf_counter()
        ecl._upsert(touched)
        t_upsert.append(time.perf_counter() - t1)
        t_stats.append(t1 - t)
    # Eager: every update re-whitens all means and rebuilds the index.
    eager = GaussianECL(rewhiten="eager")
    eager.stats_, eager.whitener_ = ecl.stats_, ecl.whitener_
    eager.sigma_at_whiten_, eager.index_ = ecl.sigma_at_whiten_, ecl.index_
    eager._slot_of, eager._class_of_slot, eager._n_slots = ecl._slot_of, ecl._class_of_slot, ecl._n_slots
    eager.stale_, eager.rewhitens_ = ecl.stale_, 0
    eager_times = []
    for j in range(eager_repeat):
        cid = n_classes + 2 * adds + 1000 + j
        x = rng.standard_normal((1, 32)).astype(np.float32) @ basis + rng.standard_normal((per_class, DIM)).astype(np.float32) @ mix
        t = time.perf_counter()
        eager.add_vectors(x, np.full(per_class, cid))
        eager_times.append(time.perf_counter() - t)
    return {
        "classes": n_classes,
        "query_ms": 1000 * batch_s / queries,
        "add_class_ms": 1000 * statistics.median(add_times),
        "add_class_ms_p90": 1000 * float(np.quantile(add_times, 0.9)),
        "add_class_ms_eager": 1000 * statistics.median(eager_times),
        "add_stats_ms": 1000 * statistics.median(t_stats),
        "add_index_ms": 1000 * statistics.median(t_upsert),
        "query_ms_single": 1000 * statistics.median(single),
        "rewhiten_ms": 1000 * build_s,
        "stats_seconds": stats_s,
        "index_kind": ecl.index_.kind,
        "index_recall_at_5_vs_exact": recall,
        "top1_is_true_class": top1_ok,
        "query_batch": queries,
        "examples_per_class": per_class,
        "deferred_adds": adds,
        "forced_rewhitens_during_adds": forced,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--adds", type=int, default=50)
    ap.add_argument("--eager-repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (read before numpy loads)")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = []
    print(f"{'classes':>8} {'query_ms':>9} {'single_ms':>9} {'add_ms':>8} {'add_p90':>8} {'stats_ms':>8} {'index_ms':>8} "
          f"{'eager_add_ms':>12} {'rewhiten_ms':>11} {'index':>6} {'recall@5':>8}")
    for n in args.sizes:
        r = bench_size(n, per_class=args.per_class, queries=args.queries, adds=args.adds,
                       eager_repeat=args.eager_repeat if n < 100_000 else 1, seed=args.seed)
        rows.append(r)
        print(f"{r['classes']:>8} {r['query_ms']:>9.3f} {r['query_ms_single']:>9.3f} {r['add_class_ms']:>8.3f} "
              f"{r['add_class_ms_p90']:>8.3f} {r['add_stats_ms']:>8.3f} {r['add_index_ms']:>8.3f} "
              f"{r['add_class_ms_eager']:>12.1f} {r['rewhiten_ms']:>11.1f} "
              f"{r['index_kind']:>6} {r['index_recall_at_5_vs_exact']:>8.3f}", flush=True)
    from iclcls.io import atomic_write_json

    atomic_write_json(args.out, {
        "benchmark": "bench_ecl",
        "dim": DIM,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "threads": args.threads,
                    "load_average_1min": os.getloadavg()[0]},
        "notes": "query_ms: per query in a batch of --queries; add_class_ms: one new class with rewhiten='deferred' "
                 "(median); add_class_ms_eager: the same with rewhiten='eager' (full re-whitening + index rebuild); "
                 "synthetic vectors, not LLM tags",
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
