"""Intent classification quality on real data: retriever baselines vs the full pipeline.

BANKING77 / CLINC150 (no out-of-scope), 10-shot pools (dialoglue_splits/*/train_10.csv), a
fixed seeded subset of the test set. Everything is chosen without test data: the shortlister
(1-NN, class mean, kNN vote, ECL) by cross-validation accuracy on the pool, the fusion weight
and the conformal calibration on cross-validation predictions of the pool (``fit``'s default;
``--tune validation`` uses a seeded validation subset instead), and the LM ranker (direct label
likelihood or noisy channel, ``--ranker cv``) by the tuned pool CV accuracy. Reports each retriever, the LM
alone over the shortlist, the pipeline, the paired bootstrap 95% interval of (pipeline - its
own retriever), and conformal coverage / mean set size at ``--alpha``.

    python eval/quality_intent.py --dataset banking77 --n 500 --lm smollm2

Writes eval/results/quality_{dataset}_{lm}.json (with `_{embedder}` appended for a non-default embedder). Predictions are checkpointed per batch
(iclcls.experiment.PredictionCheckpoint, in quality_{dataset}_{lm}.checkpoint/), so an
interrupted run with the same options resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from iclcls.data import load_benchmark
from iclcls.experiment import PredictionCheckpoint, subset
from iclcls.io import atomic_write_json
from iclcls.programs import knn_channel, knn_fusion, retriever_only
from iclcls.types import Prediction

RESULTS = Path(__file__).resolve().parent / "results"


def accuracy(preds, examples) -> float:
    return float(np.mean([p.label == e.label for p, e in zip(preds, examples)]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["banking77", "clinc150"], required=True)
    ap.add_argument("--n", type=int, default=500, help="seeded test subset size")
    ap.add_argument("--tune", choices=["cv", "validation"], default="cv", help="tune on pool cross-validation (default) or validation")
    ap.add_argument("--cv-size", type=int, default=200, help="pool examples predicted by cross-validation for tuning")
    ap.add_argument("--n-val", type=int, default=100, help="seeded validation subset (with --tune validation)")
    ap.add_argument("--alpha", type=float, default=0.1, help="conformal miscoverage level")
    ap.add_argument("--embedder", default=None, help="embedder spec (default MiniLM; 'mpnet' after scripts/install_mpnet.sh)")
    ap.add_argument("--lm", default="smollm2", help="LM spec (smollm2, gemma3-270m, ...); 'none' skips the LM")
    ap.add_argument("--ranker", choices=["cv", "likelihood", "channel"], default="cv",
                    help="LM ranker: direct label likelihood, noisy channel, or (cv) the one with the better pool CV accuracy")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--shortlist-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--force", action="store_true", help="discard a checkpoint of other settings instead of refusing it")
    args = ap.parse_args(argv)

    bench = load_benchmark(f"{args.dataset}_10shot", data_dir=args.data_dir)
    test = subset(bench.test, args.n, args.seed)
    val = subset(bench.validation, args.n_val, args.seed)
    out: dict = {"dataset": args.dataset, "pool": f"{args.dataset}_10shot", "n": len(test), "lm": args.lm,
                 "shots": args.shots, "shortlist_k": args.shortlist_k, "seed": args.seed,
                 "command": "python eval/quality_intent.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    retrievers = {
        "one_nn": {"name": "knn_vote", "neighbors": 1},
        "class_mean": "class_mean",
        "knn_vote": "knn_vote",
        "ecl": "ecl",
    }
    cv_acc, retr_preds = {}, {}
    for name, spec in retrievers.items():
        r = retriever_only(shortlist=spec, shortlist_k=args.shortlist_k, embedder=args.embedder).fit(bench.train, tune="none")
        held, cv = r.cross_val_predict(bench.train, size=args.cv_size, seed=args.seed)
        cv_acc[name] = accuracy(cv, held)
        retr_preds[name] = r.predict_detailed(test)
        out[name] = accuracy(retr_preds[name], test)
    # The pipeline's shortlister, picked on the pool, never on test (1-NN is a baseline only: one
    # neighbour gives the LM a single candidate).
    best = max((k for k in cv_acc if k != "one_nn"), key=cv_acc.get)
    out["retriever_cv_accuracy"] = cv_acc
    out["retriever_name"] = best
    out["retriever"] = out[best]
    out["best_retriever_on_test"] = max(retrievers, key=lambda k: out[k])  # for reference only
    out["shortlist_recall_at_10"] = float(np.mean([e.label in p.candidates[:10] for p, e in zip(retr_preds[best], test)]))

    suffix = f"_{args.embedder}" if args.embedder else ""  # MiniLM (the default) keeps the plain names
    if args.lm != "none":
        # The checkpoint's key is everything that decides the predictions: an interrupted run
        # resumes, and one of other options or data is refused (before fitting), never merged.
        settings = {k: getattr(args, k) for k in ("dataset", "n", "n_val", "lm", "shots", "shortlist_k", "seed",
                                                  "tune", "cv_size", "embedder", "ranker")} | {"shortlist": best}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        tag = args.lm.replace("/", "_").replace(":", "_") + suffix
        checkpoint = PredictionCheckpoint(RESULTS / f"quality_{args.dataset}_{tag}.checkpoint", key, force=args.force)
        presets = {"likelihood": lambda: knn_fusion(lm=lm, shots=args.shots, shortlist_k=args.shortlist_k, embedder=args.embedder),
                   "channel": lambda: knn_channel(lm=lm, shortlist_k=args.shortlist_k, embedder=args.embedder)}
        names = list(presets) if args.ranker == "cv" else [args.ranker]
        lm = args.lm
        tuned, clfs = {}, {}
        for name in names:  # every candidate ranker tuned the same way; the best tuning accuracy wins
            t0 = time.time()
            clf = presets[name]().set_params(shortlist=retrievers[best]).fit(bench.train, tune="none")
            lm = clf.lm_  # one loaded LM shared by the candidates
            out.setdefault("load_s", round(time.time() - t0, 1))
            t0 = time.time()
            if args.tune == "validation":
                clf.tune(val)
            else:
                clf.tune_cv(bench.train, size=args.cv_size, seed=args.seed)
            tuned[name] = {k: v for k, v in clf.tuned_.items() if k != "conformal"} | {"seconds": round(time.time() - t0, 1)}
            clfs[name] = clf
        ranker = max(names, key=lambda k: tuned[k]["validation_accuracy"])  # first max: likelihood on ties
        clf = clfs[ranker]
        out["ranker"] = ranker
        out["ranker_tuning"] = tuned
        out["tuning"] = tuned[ranker]
        t0 = time.time()
        records, _ = checkpoint.predict(clf, test, chunk_size=64)
        preds = [Prediction.from_dict(r) for r in records]
        out["seconds_per_query"] = round((time.time() - t0) / max(len(test), 1), 3)
        out["pipeline"] = accuracy(preds, test)
        out["fusion_weight"] = clf.ranker_.weight
        lm_top = [max(p.trace["lm_score"], key=p.trace["lm_score"].get) for p in preds]
        out["lm_only"] = float(np.mean([t == e.label for t, e in zip(lm_top, test)]))
        out["mean_prompt_tokens"] = float(np.mean([p.prompt_tokens for p in preds]))
        diff = np.array([p.label == e.label for p, e in zip(preds, test)], float) - np.array(
            [p.label == e.label for p, e in zip(retr_preds[best], test)], float)
        boot = np.random.default_rng(args.seed).integers(0, len(diff), size=(10_000, len(diff)))
        out["pipeline_minus_retriever"] = float(diff.mean())
        out["pipeline_minus_retriever_ci"] = [float(x) for x in np.percentile(diff[boot].mean(axis=1), [2.5, 97.5])]
        sets = clf.conformal_sets(preds, alpha=args.alpha)
        out["conformal_alpha"] = args.alpha
        out["conformal_coverage"] = float(np.mean([e.label in st for st, e in zip(sets, test)]))
        out["conformal_mean_set_size"] = float(np.mean([len(st) for st in sets]))
        out["shortlist_recall_at_10_pipeline"] = float(np.mean([e.label in p.candidates for p, e in zip(preds, test)]))
    else:
        tag = "none" + suffix
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality_{args.dataset}_{tag}.json"
    atomic_write_json(path, out)
    if args.lm != "none":
        shutil.rmtree(checkpoint.dir)
    keys = ["one_nn", "class_mean", "knn_vote", "ecl", "retriever_name", "retriever", "ranker", "lm_only", "pipeline",
            "pipeline_minus_retriever_ci", "conformal_coverage", "conformal_mean_set_size", "fusion_weight", "seconds_per_query"]
    print(f"| {args.dataset} | {args.lm} | " + " | ".join(f"{k}={out[k]:.3f}" if isinstance(out.get(k), float) else f"{k}={out.get(k)}" for k in keys) + " |")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
