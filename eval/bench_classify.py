"""End-to-end classification speed: iclcls on each backend against the OpenICL way.

    .venv/bin/python eval/bench_classify.py [--n 40] [--n-openicl 4] [--shots 8] [--shortlist 10]
        [--threads 2] [--systems openicl_ppl transformers vllm_engine vllm_server prefill_limit]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out eval/results/bench_classify.json]

Same model (SmolLM2-135M-Instruct; the vLLM backends load the same weights converted to
an HF folder), same BANKING77 test queries (a seeded subset of the DialoGLUE test split),
same kNN-vote shortlist of ``--shortlist`` labels and the same ``--shots`` kNN
demonstrations (MiniLM embeddings over the 10-shot pool) wherever they apply:

  openicl_ppl    the OpenICL way (PPLInferencer): for each query, the whole prompt (its kNN
                 demonstrations, no candidate list) + each of the 77 labels, one full forward
                 per label, nothing reused; the label with the highest log-prob wins.
                 Run on the first ``--n-openicl`` queries only (it is ~77 prefills a query).
  transformers   ICLClassifier, likelihood rank, TransformersLM (the predict batch's prompts and
                 their shortlisted labels' suffixes scored many per forward, tree-masked rows).
  transformers_per_request  the same, one prefill per prompt (batch 1), the label suffixes
                 scored on its KV cache: the path before batching.
  vllm_engine    the same classifier on the in-process vLLM engine (one score call per
                 predict batch, prompts prefilled once to warm the prefix cache).
  vllm_server    the same classifier through a vLLM OpenAI-compatible server on 127.0.0.1
                 (one request per query, ``concurrency`` requests in flight).
  prefill_limit  the transformers classifier's prompts, each prefilled once, no label scored:
                 the floor for any exact likelihood scorer on this backend.

Each row: system, queries_per_s, accuracy (None for prefill_limit), n, prompt_tokens_per_s
(prompt tokens the system processed per second: 77x the prompt for openicl_ppl). The
vLLM rows also carry ablations (engine: no prefix-cache warm-up, one query per call;
server: one request at a time) and a profile of where a scoring call's time goes.
Writes a JSON list of rows to ``--out``. Start-up times are reported, not counted; the
server loads while the transformers model loads, and is idle while the others are timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results"
SYSTEMS = ["openicl_ppl", "transformers", "transformers_per_request", "vllm_engine", "vllm_server", "prefill_limit"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def accuracy(preds, gold) -> float:
    return round(sum(p.label == e.label for p, e in zip(preds, gold)) / max(1, len(gold)), 4)


def make_classifier(lm, embedder, train, args):
    from iclcls import ICLClassifier

    return ICLClassifier(
        lm=lm, embedder=embedder, shortlist="knn_vote", shortlist_k=args.shortlist, select="knn",
        shots=args.shots, rank="likelihood", batch_size=args.batch_size, show_progress=False,
    ).fit(train)


def timed_predict(clf, texts):
    start = time.perf_counter()
    preds = clf.predict_detailed(texts)
    return preds, time.perf_counter() - start


def row(system: str, n: int, seconds: float, acc, tokens: int, **extra) -> dict:
    r = {
        "system": system,
        "queries_per_s": round(n / seconds, 4),
        "accuracy": acc,
        "n": n,
        "seconds": round(seconds, 2),
        "prompt_tokens_per_s": round(tokens / seconds, 1),
        **extra,
    }
    log(f"{system}: {r['queries_per_s']} queries/s, accuracy {acc}, n={n}, "
        f"{r['prompt_tokens_per_s']} prompt tokens/s")
    return r


# -- (a) the OpenICL way -----------------------------------------------------------------------


def bench_openicl(lm, clf, test, args) -> dict:
    """PPLInferencer's cost model: one full forward per (query, label), no reuse, all labels."""
    from dataclasses import replace

    import numpy as np

    queries = test[: args.n_openicl]
    builder = replace(clf.builder_, show_candidates=False)  # OpenICL's template lists no labels
    labels = list(clf.classes_)
    conts = [" " + builder.verbalize(lab) for lab in labels]
    qs = clf._queries(queries)
    cands = clf.shortlister_.shortlist(qs, args.shortlist)
    demos = clf.selector_.select(qs, cands, args.shots)  # the same kNN demonstrations
    hits, texts = 0, []
    start = time.perf_counter()
    for q, ids, gold in zip(qs, demos, queries):
        prompt = builder.build(q.text, ids, clf.pool_.examples, labels, count_tokens=lm.count_tokens,
                               budget=lm.context_window - 32)
        scores = lm.score_naive(prompt.text, conts)
        hits += labels[int(np.argmax([s.sum() for s in scores]))] == gold.label
        texts.append(prompt.text)
    seconds = time.perf_counter() - start
    tokens = sum(len(conts) * lm.count_tokens(t) for t in texts) + len(texts) * sum(map(lm.count_tokens, conts))
    return row("openicl_ppl", len(queries), seconds, round(hits / len(queries), 4), tokens,
               labels_scored=len(labels))


# -- (e) the prefill limit ------------------------------------------------------------------------


def bench_prefill(lm, preds) -> dict:
    prompts = [p.trace["prompt"] for p in preds]
    start = time.perf_counter()
    last = None
    for text in prompts:
        last = lm.prefill(text)
    if last is not None:
        last.float().sum().item()  # waits for a GPU's queued work
    seconds = time.perf_counter() - start
    return row("prefill_limit", len(prompts), seconds, None, sum(p.prompt_tokens for p in preds))


# -- (c) the engine: ablations and a profile ---------------------------------------------------------


def engine_profile(engine, preds, n_seqs: int = 20) -> dict:
    """Time the same token sequences (prompt + a shortlisted label) prefilled three ways:
    no logprobs, prompt log-probs (vLLM computes full-vocabulary log-softmax at every prompt
    position), and as the engine scores them (warm-up prefill + cached prompt log-probs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = engine._tokenizer
    seqs = []
    for p in preds:
        for lab in p.candidates:
            seqs.append(tok(p.trace["prompt"] + " " + lab)["input_ids"])
            if len(seqs) >= n_seqs:
                break
        if len(seqs) >= n_seqs:
            break
    inputs = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
    n_tokens = sum(map(len, seqs))

    def run(**kw) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True, **kw)
        start = time.perf_counter()
        engine.llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start

    plain = run()
    logprobs = run(prompt_logprobs=0)
    start = time.perf_counter()
    engine.score_batch([(tok.decode(s[:-3]), [tok.decode(s[-3:])]) for s in seqs])
    scored = time.perf_counter() - start
    out = {
        "sequences": len(seqs),
        "tokens": n_tokens,
        "prefill_no_logprobs_s": round(plain, 2),
        "prefill_prompt_logprobs_s": round(logprobs, 2),
        "engine_score_batch_s": round(scored, 2),
        "logprob_overhead": round(logprobs / plain, 2),
        "prefill_tokens_per_s": round(n_tokens / plain, 1),
    }
    log(f"engine profile: {out}")
    return out


def bench_engine(engine, embedder, train, test, args) -> dict:
    clf = make_classifier(engine, embedder, train, args)
    clf.predict_detailed([e.text for e in test[:2]])  # warm-up (not timed)
    preds, seconds = timed_predict(clf, [e.text for e in test])
    r = row("vllm_engine", len(test), seconds, accuracy(preds, test), sum(p.prompt_tokens for p in preds),
            start_s=round(engine.start_seconds, 1), last_score_stats=dict(engine.last_score_stats))
    try:
        r["ablations"] = engine_ablations(engine, clf, test, args)
        r["profile"] = engine_profile(engine, preds)
    except Exception as e:  # keep the main row
        log(f"engine ablations/profile failed: {type(e).__name__}: {e}")
    return r


def engine_ablations(engine, clf, test, args) -> dict:
    sub = test[: args.n_ablation]
    texts = [e.text for e in sub]
    abl = {"n": len(sub)}
    _, abl["default_s"] = timed_predict(clf, texts)
    engine.enable_prefix_caching = False  # no warm-up prefill, no cache reads
    try:
        _, abl["no_prefix_cache_s"] = timed_predict(clf, texts)
    finally:
        engine.enable_prefix_caching = True
    clf.set_params(batch_size=1)  # one score call per query
    _, abl["one_query_per_call_s"] = timed_predict(clf, texts)
    clf.set_params(batch_size=args.batch_size)
    abl = {k: round(v, 2) if isinstance(v, float) else v for k, v in abl.items()}
    log(f"engine ablations: {abl}")
    return abl


def bench_server(handle, embedder, train, test, args) -> dict:
    from iclcls.lm.openai_compat import OpenAICompatibleLM

    lm = OpenAICompatibleLM(handle.base_url, handle.model, timeout=600, concurrency=args.concurrency)
    try:
        clf = make_classifier(lm, embedder, train, args)
        clf.predict_detailed([e.text for e in test[:2]])
        preds, seconds = timed_predict(clf, [e.text for e in test])
        r = row("vllm_server", len(test), seconds, accuracy(preds, test), sum(p.prompt_tokens for p in preds),
                start_s=round(handle.start_seconds, 1), concurrency=args.concurrency)
        sub = [e.text for e in test[: args.n_ablation]]
        abl = {"n": len(sub)}
        try:
            _, abl[f"concurrency_{args.concurrency}_s"] = timed_predict(clf, sub)
            lm.concurrency = 1
            _, abl["concurrency_1_s"] = timed_predict(clf, sub)
        except Exception as e:  # keep the main row
            log(f"server ablations failed: {type(e).__name__}: {e}")
        abl = {k: round(v, 2) if isinstance(v, float) else v for k, v in abl.items()}
        log(f"server ablations: {abl}")
        r["ablations"] = abl
        return r
    finally:
        lm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="test queries for every system but openicl_ppl")
    ap.add_argument("--n-openicl", type=int, default=4, help="test queries for openicl_ppl (77 forwards each)")
    ap.add_argument("--n-ablation", type=int, default=16, help="queries for the vLLM ablations")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--shortlist", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8, help="server requests in flight")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--device", default=None, help="transformers device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", default=None, help="transformers dtype (default: the backend's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_classify.json")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from iclcls.data import load_benchmark
    from iclcls.embed import default_embedder
    from iclcls.experiment import subset
    from iclcls.io import atomic_write_json
    from iclcls.lm.transformers_lm import TransformersLM

    bench = load_benchmark("banking77_10shot")
    train, test = bench.train, subset(bench.test, args.n, args.seed)
    log(f"{len(test)} BANKING77 test queries, pool {len(train)}, shortlist {args.shortlist}, "
        f"{args.shots} kNN demonstrations, systems {args.systems}")
    server = None
    if "vllm_server" in args.systems:
        from iclcls.lm.convert import hf_dir_for
        from iclcls.lm.server import start_vllm_server

        server = start_vllm_server(hf_dir_for("smollm2"), max_model_len=2048, wait=False)  # loads meanwhile
    rows: list[dict] = []
    try:
        embedder = default_embedder()
        opts = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}
        lm = TransformersLM.from_name("smollm2", **opts)
        device = str(getattr(lm, "device", "cpu"))
        clf = make_classifier(lm, embedder, train, args)
        clf.predict_detailed([e.text for e in test[:2]])  # warm-up (not timed)
        if server is not None:  # loaded meanwhile; idle while the other systems are timed
            server.wait_ready(timeout=1200)
            log(f"server ready in {server.start_seconds:.1f} s")
        preds = None
        if {"transformers", "prefill_limit"} & set(args.systems):
            preds, seconds = timed_predict(clf, [e.text for e in test])
            if "transformers" in args.systems:
                rows.append(row("transformers", len(test), seconds, accuracy(preds, test),
                                sum(p.prompt_tokens for p in preds), device=device, batch_mode=lm.batch_mode))
        if "transformers_per_request" in args.systems:  # the older path: one prefill per request
            default_mode, lm.batch_mode = lm.batch_mode, "per_request"
            pr_preds, seconds = timed_predict(clf, [e.text for e in test])
            lm.batch_mode = default_mode
            rows.append(row("transformers_per_request", len(test), seconds, accuracy(pr_preds, test),
                            sum(p.prompt_tokens for p in pr_preds), device=device, batch_mode="per_request"))
        meta = {"threads": args.threads, "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "shots": args.shots, "shortlist": args.shortlist,
                "batch_size": args.batch_size}

        def save() -> None:  # after every system, so a cut-short run keeps what it measured
            for r in rows:
                r.setdefault("config", meta)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, rows)

        save()
        if "prefill_limit" in args.systems:
            rows.append(bench_prefill(lm, preds))
            save()
        if "vllm_engine" in args.systems:
            from iclcls.lm.vllm_engine import VLLMEngine

            with VLLMEngine.from_name("smollm2", max_model_len=2048) as engine:
                log(f"engine started in {engine.start_seconds:.1f} s")
                rows.append(bench_engine(engine, embedder, train, test, args))
            save()
        if server is not None:
            rows.append(bench_server(server, embedder, train, test, args))
            server.stop()
            save()
        if "openicl_ppl" in args.systems:  # last: the slowest by far
            rows.append(bench_openicl(lm, clf, test, args))
            save()
    finally:
        if server is not None:
            server.stop()
    best = max((r for r in rows if r["system"] in ("transformers", "vllm_engine", "vllm_server")),
               key=lambda r: r["queries_per_s"], default=None)
    by = {r["system"]: r for r in rows}
    if best and "openicl_ppl" in by:
        log(f"best iclcls ({best['system']}) / openicl_ppl = {best['queries_per_s'] / by['openicl_ppl']['queries_per_s']:.1f}x")
    if best and "prefill_limit" in by:
        log(f"prefill_limit / best iclcls = {by['prefill_limit']['queries_per_s'] / best['queries_per_s']:.2f}x")
    print(f"\n{'system':<15}{'queries/s':>11}{'accuracy':>10}{'n':>5}{'prompt tok/s':>14}")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{r['system']:<15}{r['queries_per_s']:>11.3f}{acc:>10}{r['n']:>5}{r['prompt_tokens_per_s']:>14.1f}")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
