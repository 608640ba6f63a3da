"""How close the classifier gets to the chip: iclcls's scoring against plain prefills of its prompts.

    python eval/bench_gpu.py [--shape smollm2 8b] [--n 96] [--batch-sizes 16 64] [--label-rows 3080]
        [--peak-tflops 790] [--device cuda] [--out eval/results/bench_gpu.json]

On whatever device it finds (cuda, else cpu), for each ``--shape``:

- ``smollm2``: the real SmolLM2-135M (its predictions mean something);
- ``135m`` / ``1b`` / ``8b``: a Llama of that shape with RANDOM weights built on the device (SmolLM2's
  tokenizer and 49,152-token vocabulary; 8b = hidden 4096, 32 layers, GQA 8, like Llama-3-8B).
  Random weights measure speed only: their predictions mean nothing.

Systems, on the same BANKING77 test queries (8 kNN demonstrations, a kNN-vote shortlist of 10,
likelihood ranking): ``iclcls`` (``predict`` at each ``--batch-sizes``, requests scored many per
forward), ``iclcls_per_request`` (the older path: one prefill per request, at the largest batch
size), ``prefill_sequential`` (each prompt prefilled alone), ``prefill_batched`` (the prompts
right-padded 16 at a time, one forward each: what the hardware gives a plain batched prefill) and
``roofline`` (2 x parameters FLOPs a prompt token at ``--peak-tflops``, the dense bf16 peak; only
on CUDA). Then, once: retriever-only ``label`` in this process (model loaded) against the embedder
alone on the same texts (``label_inprocess`` and ``embed_alone`` rows).

Rows: {"system", "device", "shape", "params_b", "batch_size", "queries_per_s",
"prompt_tokens_per_s", "n"} (+ extras); written to ``--out`` after every row, with a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "135m": (576, 30, 9, 3, 1536),
    "1b": (2048, 16, 32, 8, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.meta, self.rows = out, meta, []

    def add(self, **row) -> None:
        self.rows.append(row)
        log(" ".join(f"{k}={v}" for k, v in row.items()))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, self.out)

    def table(self) -> None:
        print(f"\n{'system':<20} {'shape':<8} {'bs':>4} {'q/s':>9} {'tok/s':>10} {'n':>5}")
        for r in self.rows:
            print(f"{r['system']:<20} {r['shape']:<8} {str(r.get('batch_size') or ''):>4} {r['queries_per_s']:>9} "
                  f"{r.get('prompt_tokens_per_s') or '':>10} {r['n']:>5}")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_lm(shape: str, device: str):
    """SmolLM2 itself, or a random-weight Llama of ``shape`` built directly on ``device``."""
    import torch

    from iclcls.lm.transformers_lm import TransformersLM

    if shape == "smollm2":
        return TransformersLM.from_name("smollm2", device=device)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from iclcls.lm.convert import hf_dir_for

    tok = AutoTokenizer.from_pretrained(hf_dir_for("smollm2"))
    h, layers, heads, kv, inter = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return TransformersLM.from_model(model, tok, name=f"random-llama-{shape}")


def time_predict(clf, texts, device) -> tuple[list, float]:
    clf.predict_detailed(texts[:4])  # warm-up: kernels, caches
    sync(device)
    t = time.perf_counter()
    preds = clf.predict_detailed(texts)
    sync(device)
    return preds, time.perf_counter() - t


def prefill_batched(lm, prompts, device, batch: int = 16) -> tuple[float, int]:
    """The prompts right-padded ``batch`` at a time, one forward each (logits of the last position)."""
    import torch

    tok = lm.tokenizer
    ids = [lm._encode_text(p) for p in prompts]
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            width = max(map(len, part))
            x = torch.full((len(part), width), tok.pad_token_id or 0, dtype=torch.long)
            m = torch.zeros((len(part), width), dtype=torch.long)
            for r, s in enumerate(part):
                x[r, : len(s)] = torch.tensor(s)
                m[r, : len(s)] = 1
            lm.model(input_ids=x.to(device), attention_mask=m.to(device), logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t, sum(map(len, ids))


def bench_shape(res: Results, shape: str, args, bench, embedder) -> None:
    import torch

    from iclcls import ICLClassifier
    from iclcls.experiment import subset

    t = time.perf_counter()
    lm = build_lm(shape, args.device)
    device = lm.device
    params = sum(p.numel() for p in lm.model.parameters())
    log(f"{shape}: {params / 1e9:.2f}B parameters on {device} ({lm.dtype}), built in {time.perf_counter() - t:.1f} s")
    common = {"device": str(device), "shape": shape, "params_b": round(params / 1e9, 3),
              "random_weights": shape != "smollm2", "dtype": str(lm.dtype).replace("torch.", "")}
    test = subset(bench.test, args.n, 0)
    texts = [e.text for e in test]
    preds = []
    clf = ICLClassifier(lm=lm, embedder=embedder, shortlist="knn_vote", shortlist_k=10, select="knn", shots=8,
                        rank="likelihood", show_progress=False).fit(bench.train, tune="none")
    runs = [("iclcls", bs, "tree") for bs in args.batch_sizes]
    runs.append(("iclcls_per_request", max(args.batch_sizes), "per_request"))
    for system, bs, mode in runs:
        if mode == "tree" and lm._choose_batch_mode("auto") != "tree":
            log(f"{shape}: this model cannot score in tree batches; skipping {system} at {bs}")
            continue
        lm.batch_mode = mode
        clf.batch_size = bs
        preds, sec = time_predict(clf, texts, device)
        tokens = sum(p.prompt_tokens for p in preds)
        acc = round(sum(p.label == e.label for p, e in zip(preds, test)) / len(test), 4)
        res.add(system=system, **common, batch_size=bs, queries_per_s=round(len(texts) / sec, 2),
                prompt_tokens_per_s=round(tokens / sec, 1), n=len(texts), seconds=round(sec, 2),
                accuracy=None if shape != "smollm2" else acc, mean_prompt_tokens=round(tokens / len(texts), 1))
    lm.batch_mode = lm._choose_batch_mode("auto")
    prompts = [p.trace["prompt"] for p in preds]
    with torch.inference_mode():
        lm.prefill(prompts[0])
        sync(device)
        t = time.perf_counter()
        for p in prompts:
            lm.prefill(p)
        sync(device)
        sec = time.perf_counter() - t
    tokens = sum(lm.count_tokens(p) for p in prompts)
    res.add(system="prefill_sequential", **common, batch_size=1, queries_per_s=round(len(prompts) / sec, 2),
            prompt_tokens_per_s=round(tokens / sec, 1), n=len(prompts))
    prefill_batched(lm, prompts[:16], device)  # warm-up
    sec, tokens = prefill_batched(lm, prompts, device)
    res.add(system="prefill_batched", **common, batch_size=16, queries_per_s=round(len(prompts) / sec, 2),
            prompt_tokens_per_s=round(tokens / sec, 1), n=len(prompts),
            tflops=round(2 * params * tokens / sec / 1e12, 2))
    if device.type == "cuda" and args.peak_tflops:
        per_query = 2 * params * tokens / len(prompts)
        res.add(system="roofline", **common, batch_size=None, queries_per_s=round(args.peak_tflops * 1e12 / per_query, 1),
                prompt_tokens_per_s=round(args.peak_tflops * 1e12 / (2 * params), 1), n=len(prompts),
                peak_tflops=args.peak_tflops)
    del clf, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_label(res: Results, args, bench, embedder) -> None:
    """Retriever-only ``label`` in this process (state loaded once) against the embedder alone."""
    from iclcls import ICLClassifier
    from iclcls.label import LabelOptions, label_corpus

    rows = bench.test[: args.label_rows]
    texts = [e.text for e in rows]
    device = str(getattr(getattr(embedder, "model", None), "device", "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        state = Path(tmp) / "state"
        ICLClassifier(lm=None, embedder=embedder, shortlist="knn_vote", shortlist_k=10, rank="retriever",
                      show_progress=False).fit(bench.train, tune="none").save(state)
        inner = getattr(embedder, "embedder", embedder)
        inner.encode(texts[:64])  # warm-up
        t = time.perf_counter()
        inner.encode(texts)
        sec_embed = time.perf_counter() - t
        opts = LabelOptions(progress=False, chunk_rows=args.label_chunk)
        label_corpus(src, state=state, out=Path(tmp) / "warm.jsonl", options=LabelOptions(progress=False, limit=64))
        t = time.perf_counter()
        summary = label_corpus(src, state=state, out=Path(tmp) / "out.jsonl", options=opts)
        sec_label = time.perf_counter() - t
    common = {"device": device, "shape": "minilm", "params_b": None, "batch_size": args.label_chunk, "n": len(texts)}
    res.add(system="embed_alone", **common, queries_per_s=round(len(texts) / sec_embed, 1), prompt_tokens_per_s=None)
    res.add(system="label_inprocess", **common, queries_per_s=round(len(texts) / sec_label, 1),
            prompt_tokens_per_s=None, rows_done=summary.rows_done, ratio_to_embed=round(sec_embed / sec_label, 3),
            includes="state load + label loop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["smollm2", "8b"], choices=["smollm2", *SHAPES])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--label-rows", type=int, default=3080)
    ap.add_argument("--label-chunk", type=int, default=256)
    ap.add_argument("--no-label", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak for the roofline (default: 790 on an H100/H200, else none)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_gpu.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    if args.peak_tflops is None and any(k in name for k in ("H100", "H200")):
        args.peak_tflops = 790.0
    from iclcls.data import load_benchmark
    from iclcls.embed import default_embedder

    res = Results(args.out, {"device_name": name, "torch": torch.__version__, "started": time.strftime("%F %T"),
                             "note": "random-weight shapes measure speed only; their accuracy is meaningless"})
    bench = load_benchmark("banking77_10shot")
    embedder = default_embedder()
    for shape in args.shape:
        try:
            bench_shape(res, shape, args, bench, embedder)
        except Exception as e:  # one shape's failure (memory) must not lose the others' rows
            log(f"{shape}: failed: {type(e).__name__}: {e}")
            res.meta.setdefault("errors", []).append(f"{shape}: {type(e).__name__}: {e}")
    if not args.no_label:
        bench_label(res, args, bench, embedder)
    res.table()
    best = {}
    for r in res.rows:
        best.setdefault(r["shape"], {})
        k = r["system"]
        best[r["shape"]][k] = max(best[r["shape"]].get(k, 0), r["queries_per_s"])
    for shape, b in best.items():
        if "iclcls" in b and "prefill_batched" in b:
            print(f"{shape}: iclcls best / prefill_batched = {b['iclcls'] / b['prefill_batched']:.2f}")
    if "label_inprocess" in best.get("minilm", {}):
        print(f"label in-process / embedder alone = {best['minilm']['label_inprocess'] / best['minilm']['embed_alone']:.2f}")


if __name__ == "__main__":
    main()
