"""Many-shot scoring with and without reusing the shared demonstrations prefix's KV cache.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_many_shot.py [--shots 16] [--queries 20] [--model smollm2]

The real pipeline builds the prompts: BANKING77 10-shot pool, many-shot selector (one fixed
class-balanced order: every query gets the same ``--shots`` demonstrations), the
``classify_demos_first`` template (instructions and demonstrations first, then the
query's 10 shortlisted candidate labels and the query), likelihood scoring of the 10
candidates. For each of ``--queries`` test queries, one ``score_batch`` call per query in
both modes, interleaved (so load changes on a shared machine hit both alike):
  without: ``score_batch([request])``: the whole prompt is prefilled for every query;
  with:    ``score_batch([request], shared_prefix=prefix)``: the prefix's KV cache is computed
           once (timed separately, ``prefix_prefill_s``) and reused by every query.
Checks that both give the same log-probabilities; prints a table; writes
eval/results/bench_many_shot.json (``with_reuse_s`` / ``without_reuse_s``: seconds per query).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_many_shot.json")
    args = ap.parse_args()

    import torch

    from iclcls.classifier import ICLClassifier
    from iclcls.data import load_benchmark
    from iclcls.experiment import subset
    from iclcls.io import atomic_write_json
    from iclcls.lm.transformers_lm import TransformersLM

    bench = load_benchmark("banking77_10shot")
    lm = TransformersLM.from_name(args.model)
    queries = subset(bench.test, args.queries, args.seed)
    variants = []
    for name, show in (("candidates listed after the demonstrations (the study's prompt)", True),
                       ("plain many-shot prompt: demonstrations, then the query", False)):
        clf = ICLClassifier(
            lm=lm, shortlist="knn_vote", shortlist_k=args.candidates, shots=args.shots, rank="likelihood",
            select={"name": "many_shot", "order": "class_balanced", "seed": args.seed},
            prompt={"template": "classify_demos_first", "show_candidates": show},
        ).fit(bench.train)
        variants.append((name, show, measure(clf, lm, queries, args)))
    headline = variants[0][2]
    result = {
        "model": lm.name,
        "shots": args.shots,
        "queries": len(queries),
        "candidates_per_query": args.candidates,
        **headline,
        "variants": [{"prompt": name, "show_candidates": show, **m} for name, show, m in variants],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "device": str(lm.device),
    }
    atomic_write_json(args.out, result)
    print(f"{lm.name}: {args.shots}-shot many-shot prompts, {args.candidates} candidate labels scored per query, "
          f"{len(queries)} queries, {torch.get_num_threads()} torch thread(s)")
    print(f"{'prompt':<66}{'tokens':>7}{'shared':>7}{'without s/q':>12}{'with s/q':>10}{'speedup':>9}")
    for name, _, m in variants:
        print(f"{name:<66}{m['prompt_tokens_mean']:>7.0f}{m['prefix_tokens']:>7}{m['without_reuse_s']:>12.3f}"
              f"{m['with_reuse_s']:>10.3f}{m['speedup']:>8.2f}x")
    print(f"headline (first row): {headline['speedup']:.2f}x (median {headline['speedup_median']:.2f}x); "
          f"max |logprob difference| {max(m['max_abs_logprob_diff'] for _, _, m in variants):.2e}")
    print(f"wrote {args.out}")


def measure(clf, lm, queries, args) -> dict:
    """Per-query seconds of score_batch without and with the shared prefix, interleaved."""
    import numpy as np

    from iclcls.rank.base import RankContext
    from iclcls.rank.likelihood import shared_prefix

    qs = clf._queries(queries)
    cands = clf.shortlister_.shortlist(qs, args.candidates)
    ids = clf.selector_.select(qs, cands, args.shots)
    budget = lm.context_window - clf.label_token_reserve
    prompts = [clf.builder_.build(q.text, i, clf.pool_.examples, c.labels, count_tokens=lm.count_tokens, budget=budget)
               for q, i, c in zip(qs, ids, cands)]
    prefix = shared_prefix(RankContext(lm, qs, cands, prompts, clf.builder_, clf.pool_))
    if not prefix:
        raise SystemExit("the prompts share no demonstrations prefix: check the template and selector")
    verbal = clf.builder_.verbalize
    requests = [(p.text, [" " + verbal(lab) for lab in c.labels]) for p, c in zip(prompts, cands)]

    lm.score_batch(requests[:1])  # warm-up (allocations, first-call overheads)
    t0 = time.perf_counter()
    lm.prefill(prefix)  # what computing the prefix's KV cache once costs
    prefix_prefill = time.perf_counter() - t0
    lm.clear_prefix_cache()
    lm.score_batch(requests[:1], shared_prefix=prefix)  # computes and caches the prefix

    with_s, without_s, max_diff = [], [], 0.0
    for req in requests:
        t0 = time.perf_counter()
        a = lm.score_batch([req])
        without_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = lm.score_batch([req], shared_prefix=prefix)
        with_s.append(time.perf_counter() - t0)
        for x, y in zip(a[0], b[0]):
            max_diff = max(max_diff, float(np.max(np.abs(x - y))))
    return {
        "prefix_tokens": lm.count_tokens(prefix),
        "prompt_tokens_mean": float(np.mean([p.tokens for p in prompts])),
        "without_reuse_s": statistics.mean(without_s),
        "with_reuse_s": statistics.mean(with_s),
        "without_reuse_median_s": statistics.median(without_s),
        "with_reuse_median_s": statistics.median(with_s),
        "speedup": statistics.mean(without_s) / statistics.mean(with_s),
        "speedup_median": statistics.median(without_s) / statistics.median(with_s),
        "prefix_prefill_s": prefix_prefill,
        "max_abs_logprob_diff": max_diff,
    }


if __name__ == "__main__":
    main()
