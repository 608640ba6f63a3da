"""IReRa as a DSPy program on ESCO TECH: retrieval alone, the uncompiled program, the compiled one.

Compiles on the validation split (seeded train/val halves), scores a seeded test subset,
and writes eval/results/dspy_esco_tech.json with, per system, RP@5, RP@10, R@50, LM calls
and seconds per sentence, and the share of Rank outputs that parsed to no label (plus the
same per step). The JSON is rewritten after each stage, so a cut-short run keeps what it did.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_dspy.py --n 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def score(gold, ranked) -> dict[str, float]:
    from iclcls.metrics import recall_at_k, rp_at_k

    return {
        "rp@5": round(100 * rp_at_k(gold, ranked, 5), 2),
        "rp@10": round(100 * rp_at_k(gold, ranked, 10), 2),
        "r@50": round(100 * recall_at_k(gold, ranked, 50), 2),
    }


def run_program(program, examples, *, name: str, log=print) -> tuple[dict, list]:
    program.stats.reset()
    ranked, seconds, rows = [], [], []
    for i, ex in enumerate(examples):
        t0 = time.time()
        out = program(text=ex.text)
        seconds.append(time.time() - t0)
        ranked.append(list(out.ranking))
        rows.append({"text": ex.text, "gold": list(ex.labels), "guesses": list(out.guesses), "lm_labels": list(out.lm_labels), "top10": list(out.ranking[:10])})
        if (i + 1) % 5 == 0:
            log(f"  {name}: {i + 1}/{len(examples)} ({sum(seconds) / len(seconds):.1f} s/sentence)")
    steps = program.stats.summary()
    n = len(examples)
    res = score([ex.labels for ex in examples], ranked)
    res["lm_calls_per_input"] = round(sum(s["lm_calls"] for s in steps.values()) / n, 3)
    res["s_per_input"] = round(sum(seconds) / n, 2)
    res["unparsed_share"] = round(steps["rank"]["unparsed_share"], 4) if program.rank is not None else 0.0
    res["steps"] = {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in s.items()} for k, s in steps.items() if s["inputs"]}
    return res, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "eval/configs/esco_tech_dspy.yaml"))
    ap.add_argument("--n", type=int, default=None, help="test sentences (seeded subset; default: the config's test_size)")
    ap.add_argument("--program-dir", default=str(REPO / "runs/dspy_esco_tech"))
    ap.add_argument("--out", default=str(REPO / "eval/results/dspy_esco_tech.json"))
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. classifier.dspy.rank.rank_k=30")
    ap.add_argument("--reuse-compiled", action="store_true", help="load --program-dir instead of compiling")
    args = ap.parse_args()

    import yaml

    from iclcls.dspy.compile import (
        LMPool,
        build_program,
        compile_split,
        fit_retriever,
        load_compile_config,
        load_compiled,
        optimize,
        save_compiled,
    )
    from iclcls.experiment import load_splits
    from iclcls.io import atomic_write_json

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.n:
        overrides["data.test_size"] = args.n
    cfg = load_compile_config(args.config, overrides=overrides)
    opts = cfg.classifier.dspy
    splits = load_splits(cfg.data)
    test = [ex for ex in splits.test if ex.labels]
    train, val = compile_split(splits.validation, opts.optimizer)
    result: dict = {
        "benchmark": splits.name,
        "n": len(test),
        "test_subset": {"size": len(test), "seed": cfg.data.seed},
        "compile_data": {"train": len(train), "val": len(val), "from": "validation split"},
        "options": json.loads(opts.model_dump_json()),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python eval/bench_dspy.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores (shared), no GPU",
    }

    def write() -> None:
        atomic_write_json(args.out, result)

    print(f"{splits.name}: {len(test)} test sentences; compile on {len(train)} train / {len(val)} val")
    retriever = fit_retriever(opts.retrieve, splits.train, splits.labels, priors=splits.priors)
    lms = LMPool()

    # retrieval alone: the same program without Infer and Rank
    bare = opts.model_copy(deep=True)
    bare.infer.enabled = bare.rank.enabled = False
    res, _ = run_program(build_program(bare, retriever), test, name="retrieve")
    result["retrieve"] = {k: v for k, v in res.items() if k != "steps"}
    print("retrieve", result["retrieve"])
    write()

    program = build_program(opts, retriever, lms=lms)
    res, rows = run_program(program, test, name="uncompiled")
    result["uncompiled"] = res
    result["examples_uncompiled"] = rows[:5]
    print("uncompiled", {k: v for k, v in res.items() if k != "steps"})
    write()

    if args.reuse_compiled:
        compiled = load_compiled(args.program_dir, lms=lms)
        result["compile"] = {"reused": args.program_dir}
    else:
        student = build_program(opts, retriever, lms=lms, cache=opts.optimizer.cache)
        task_lm = student.rank._lm.value if student.rank is not None else None
        compiled, report = optimize(student, opts.optimizer, train, val, task_lm=task_lm)
        save_compiled(compiled, opts, args.program_dir, info={"report": report, "benchmark": splits.name})
        result["compile"] = report
        print("compile", report)
        write()
        compiled = load_compiled(args.program_dir, lms=lms)  # measure the reloaded program
    res, rows = run_program(compiled, test, name="compiled")
    result["compiled"] = res
    result["examples_compiled"] = rows[:5]
    print("compiled", {k: v for k, v in res.items() if k != "steps"})
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
