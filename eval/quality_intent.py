"""Intent classification quality on real data: retriever baselines vs the full pipeline.

BANKING77 / CLINC150 (no out-of-scope), 10-shot pools (dialoglue_splits/*/train_10.csv), a
fixed seeded subset of the test set. Reports 1-NN, kNN-vote alone, shortlist@10 recall,
the LM alone over the shortlist, and the full pipeline (shortlist 10, kNN demonstrations
least-to-most similar, likelihood rank, fusion with the weight tuned on validation).

    python eval/quality_intent.py --dataset banking77 --n 500 --lm smollm2

Writes eval/results/quality_{dataset}_{lm}.json. Predictions are checkpointed per batch to a
.partial.jsonl file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from iclcls.classifier import ICLClassifier
from iclcls.data import load_benchmark
from iclcls.experiment import subset
from iclcls.io import atomic_write_json
from iclcls.programs import knn_fusion, retriever_only
from iclcls.types import Prediction

RESULTS = Path(__file__).resolve().parent / "results"


def accuracy(preds, examples) -> float:
    return float(np.mean([p.label == e.label for p, e in zip(preds, examples)]))


def predict_with_checkpoint(clf: ICLClassifier, examples, path: Path, batch: int = 16) -> list[Prediction]:
    """Predict in batches, appending each to ``path``; reuse what an earlier run finished."""
    done: list[Prediction] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.append(Prediction.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line: redo from there
        print(f"resuming: {len(done)} predictions already in {path.name}", file=sys.stderr)
    with open(path, "w", encoding="utf-8") as f:
        for p in done:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        for i in range(len(done), len(examples), batch):
            preds = clf.predict(examples[i : i + batch], show_progress=False)
            for p in preds:
                f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
            f.flush()
            done += preds
            print(f"  {len(done)}/{len(examples)} acc so far {accuracy(done, examples):.3f}", file=sys.stderr, flush=True)
    return done


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["banking77", "clinc150"], required=True)
    ap.add_argument("--n", type=int, default=500, help="seeded test subset size")
    ap.add_argument("--n-val", type=int, default=100, help="seeded validation subset for tuning the fusion weight")
    ap.add_argument("--lm", default="smollm2", help="LM spec (smollm2, gemma3-270m, ...); 'none' skips the LM")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--shortlist-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    bench = load_benchmark(f"{args.dataset}_10shot", data_dir=args.data_dir)
    test = subset(bench.test, args.n, args.seed)
    val = subset(bench.validation, args.n_val, args.seed)
    out: dict = {"dataset": args.dataset, "pool": f"{args.dataset}_10shot", "n": len(test), "lm": args.lm,
                 "shots": args.shots, "shortlist_k": args.shortlist_k, "seed": args.seed,
                 "command": "python eval/quality_intent.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    one_nn = retriever_only(shortlist={"name": "knn_vote", "neighbors": 1}).fit(bench.train)
    out["one_nn"] = accuracy(one_nn.predict(test), test)
    vote = retriever_only(shortlist_k=args.shortlist_k).fit(bench.train)
    vote_preds = vote.predict(test)
    out["knn_vote"] = accuracy(vote_preds, test)
    out["shortlist_recall_at_10"] = float(np.mean([e.label in p.candidates[:10] for p, e in zip(vote_preds, test)]))
    mean = retriever_only(shortlist="class_mean").fit(bench.train)
    out["class_mean"] = accuracy(mean.predict(test), test)

    if args.lm != "none":
        t0 = time.time()
        clf = knn_fusion(lm=args.lm, shots=args.shots, shortlist_k=args.shortlist_k).fit(bench.train)
        out["load_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        clf.tune(val)
        out["tuning"] = clf.tuned_ | {"n_val": len(val), "seconds": round(time.time() - t0, 1)}
        t0 = time.time()
        tag = args.lm.replace("/", "_").replace(":", "_")
        partial = RESULTS / f"quality_{args.dataset}_{tag}.partial.jsonl"
        preds = predict_with_checkpoint(clf, test, partial)
        out["seconds_per_query"] = round((time.time() - t0) / max(len(test), 1), 3)
        out["pipeline"] = accuracy(preds, test)
        out["fusion_weight"] = clf.ranker_.weight
        lm_top = [max(p.trace["lm_score"], key=p.trace["lm_score"].get) for p in preds]
        out["lm_only"] = float(np.mean([t == e.label for t, e in zip(lm_top, test)]))
        out["mean_prompt_tokens"] = float(np.mean([p.prompt_tokens for p in preds]))
        out["shortlist_recall_at_10_pipeline"] = float(np.mean([e.label in p.candidates for p, e in zip(preds, test)]))
    else:
        tag = "none"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality_{args.dataset}_{tag}.json"
    atomic_write_json(path, out)
    if args.lm != "none":
        partial.unlink(missing_ok=True)
    keys = ["one_nn", "class_mean", "knn_vote", "shortlist_recall_at_10", "lm_only", "pipeline", "fusion_weight", "seconds_per_query"]
    print(f"| {args.dataset} | {args.lm} | " + " | ".join(f"{k}={out[k]:.3f}" if isinstance(out.get(k), float) else f"{k}={out.get(k)}" for k in keys) + " |")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
