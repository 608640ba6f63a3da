"""Speed of the default embedder, its disk cache, and VectorIndex (exact vs HNSW).

    .venv/bin/python eval/bench_embed.py [--sentences 2000] [--sizes 1000 10000 100000]

Prints a table and writes eval/results/bench_embed.json.

Index data: "clustered" unit vectors (low intrinsic dimension, like real sentence
embeddings) and "random" uniform unit vectors (HNSW's worst case: every point is about
equally far from every other, so graph search degenerates; HNSW on 10^5 of them is
skipped by default, see --random-hnsw-max).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results" / "bench_embed.json"


def data_dir() -> Path:
    for cand in (os.environ.get("ICLCLS_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set ICLCLS_DATA or put it at ../shared/data")


def load_sentences(n: int) -> list[str]:
    path = data_dir() / "banking77" / "train.csv"
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    texts = list(dict.fromkeys(texts))  # unique, so the cached pass re-reads every row
    if len(texts) < n:
        raise SystemExit(f"{path}: only {len(texts)} unique texts, asked for {n}")
    return texts[:n]


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_embedder(n: int, batch_size: int) -> dict:
    from iclcls.embed import CachedEmbedder, default_embedder

    texts = load_sentences(n)
    st = default_embedder(cache=False)
    st.encode(texts[:batch_size], batch_size=batch_size)  # load the model, warm up
    t_raw, _ = timed(lambda: st.encode(texts, batch_size=batch_size, show_progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        cached = CachedEmbedder(st, cache_dir=tmp)
        t_fill, _ = timed(lambda: cached.encode(texts, batch_size=batch_size, show_progress=False))
        t_hit, _ = timed(lambda: cached.encode(texts), repeat=3)
        assert cached.misses == n, cached.misses
        cached.close()
    return {
        "model": st.name,
        "sentences": n,
        "batch_size": batch_size,
        "uncached_s": t_raw,
        "uncached_per_s": n / t_raw,
        "cache_fill_s": t_fill,
        "cache_fill_per_s": n / t_fill,
        "cached_s": t_hit,
        "cached_per_s": n / t_hit,
        "cached_speedup": t_raw / t_hit,
    }


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Uniform random unit vectors: the worst case for HNSW (no low-dimensional structure)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, *, latent: int = 24, clusters: int = 200):
    """Unit vectors with low intrinsic dimension, like sentence embeddings: cluster centres
    in a ``latent``-d space, projected to ``dim`` with isotropic noise on top."""
    proj = rng.standard_normal((latent, dim)).astype(np.float32)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    z = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ proj + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_index(
    data: str, sizes: list[int], dim: int, n_queries: int, k: int, hnsw_max: int
) -> list[dict]:
    from iclcls.index import VectorIndex

    make = {"random": unit, "clustered": clustered}[data]
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        both = make(rng, n + n_queries, dim)  # queries from the same distribution, held out
        x, queries = both[:n], both[n:]
        ids = np.arange(n, dtype=np.int64)
        truth = None
        for kind in ("flat", "hnsw"):
            if kind == "hnsw" and n > hnsw_max:
                print(f"  index {data} n={n:>7} hnsw: skipped (> --{data}-hnsw-max {hnsw_max})")
                continue
            index = VectorIndex(dim, exact_threshold=10**12 if kind == "flat" else 0, use_gpu=False)
            t_build, _ = timed(lambda: index.add(x, ids))
            assert index.kind == kind
            index.search(queries[:5], k)  # warm up
            t_search, (_, found) = timed(lambda: index.search(queries, k), repeat=5)
            if kind == "flat":
                truth = found
            rec = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
            rows.append(
                {
                    "data": data,
                    "n": n,
                    "kind": kind,
                    "dim": dim,
                    "build_s": t_build,
                    "search_ms_per_query": 1000 * t_search / n_queries,
                    "queries": n_queries,
                    "k": k,
                    "recall_at_k_vs_exact": rec,
                    "hnsw_m": index.hnsw_m,
                    "ef_search": index.ef_search,
                    "ef_construction": index.ef_construction,
                }
            )
            print(
                f"  index {data} n={n:>7} {kind:<4}: build {t_build:7.2f} s, "
                f"{rows[-1]['search_ms_per_query']:.3f} ms/query, recall@{k} {rec:.3f}",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--data", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    ap.add_argument("--clustered-hnsw-max", type=int, default=10**9)
    ap.add_argument(
        "--random-hnsw-max",
        type=int,
        default=10_000,
        help="skip HNSW on random data above this size (10^5 takes ~4 min to build on 2 cores)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss
    import torch

    from iclcls.io import atomic_write_json

    t0 = time.perf_counter()
    emb = bench_embedder(args.sentences, args.batch_size)
    index_rows = []
    for data in args.data:
        hnsw_max = getattr(args, f"{data}_hnsw_max")
        index_rows += bench_index(data, args.sizes, args.dim, args.queries, args.k, hnsw_max)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"Embedder {emb['model']} ({emb['sentences']} banking77 sentences, batch {emb['batch_size']})")
    for col in ("mode", "seconds", "sentences/s", "vs uncached"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    t.add_row("uncached", f"{emb['uncached_s']:.2f}", f"{emb['uncached_per_s']:.0f}", "1.0x")
    t.add_row(
        "cache fill (miss)",
        f"{emb['cache_fill_s']:.2f}",
        f"{emb['cache_fill_per_s']:.0f}",
        f"{emb['uncached_s'] / emb['cache_fill_s']:.2f}x",
    )
    t.add_row(
        "cached (hit)",
        f"{emb['cached_s']:.3f}",
        f"{emb['cached_per_s']:.0f}",
        f"{emb['cached_speedup']:.0f}x",
    )
    console.print(t)
    t = Table(title=f"VectorIndex (faiss, CPU), unit vectors of dim {args.dim}, {args.queries} queries, k={args.k}")
    for col in ("data", "n", "kind", "build s", "ms/query", f"recall@{args.k}"):
        t.add_column(col, justify="right")
    for r in index_rows:
        t.add_row(
            r["data"],
            f"{r['n']:,}",
            r["kind"],
            f"{r['build_s']:.2f}",
            f"{r['search_ms_per_query']:.3f}",
            f"{r['recall_at_k_vs_exact']:.3f}",
        )
    console.print(t)

    atomic_write_json(
        args.out,
        {
            "embedder": emb,
            "index": index_rows,
            "env": {
                "cpu_count": os.cpu_count(),
                "load_avg_1_5_15m_at_end": list(os.getloadavg()),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "faiss": faiss.__version__,
                "faiss_threads": faiss.omp_get_max_threads(),
                "cuda": torch.cuda.is_available(),
            },
            "total_s": time.perf_counter() - t0,
            "command": "python eval/bench_embed.py " + " ".join(sys.argv[1:]),
        },
    )
    console.print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
