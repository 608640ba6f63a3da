"""IReRa as a DSPy program on ESCO TECH or HOUSE: retrieval alone, the uncompiled program, the compiled one.

Compiles with the one-SE rule on the whole validation split (``iclcls.programs.dspy.select``),
scores a seeded test subset (n = 100 by default) and writes
eval/results/dspy_esco_{tech,house}[_LM].json with, per system, RP@5, RP@10, R@50, the
share of Rank outputs that parsed to no label, LM calls and seconds per sentence, and
paired bootstrap intervals of each program's difference to retrieval on the same sentences.
The JSON is rewritten after each stage, so a cut-short run keeps what it did.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_dspy.py --benchmark tech
    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_dspy.py --benchmark house --lm gemma3-270m
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

METRICS = (("rp@5", "rp", 5), ("rp@10", "rp", 10), ("r@50", "r", 50))


def per_example(gold, ranked) -> dict:
    """Per-sentence values of each reported metric (fractions)."""
    from iclcls.programs.dspy.select import per_example_recall, per_example_rp

    return {name: (per_example_rp if kind == "rp" else per_example_recall)(gold, ranked, k) for name, kind, k in METRICS}


def versus(values: dict, base: dict) -> dict:
    """Paired bootstrap (same resampled sentences) of the mean difference to ``base``, in points."""
    from iclcls.metrics import bootstrap_interval

    out = {}
    for name in values:
        d = values[name] - base[name]
        lo, hi = bootstrap_interval(d, n_resamples=2000)
        out[name] = {"diff": round(100 * float(d.mean()), 2), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}
    return out


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_program(program, examples, *, name: str, threads: int, log=print) -> tuple[dict, dict, list]:
    """The program on every example (``threads`` in flight): (metrics, per-example values, rows)."""
    from iclcls.programs.dspy.modules import map_threads

    program.stats.reset()
    done = [0]
    t0 = time.time()
    load0 = load_now()

    def one(ex):
        out = program(text=ex.text)
        done[0] += 1
        if done[0] % 10 == 0:
            log(f"  {name}: {done[0]}/{len(examples)} ({(time.time() - t0) / done[0]:.1f} s/sentence, load {load_now()[0]})")
        return out

    outs = map_threads(one, examples, threads=threads)
    wall = time.time() - t0
    ranked = [list(o.ranking) for o in outs]
    gold = [list(ex.labels) for ex in examples]
    values = per_example(gold, ranked)
    steps = program.stats.summary()
    n = len(examples)
    res = {name: round(100 * float(v.mean()), 2) for name, v in values.items()}
    res["unparsed_share"] = round(steps["rank"]["unparsed_share"], 4) if steps["rank"]["inputs"] else 0.0
    res["lm_calls_per_input"] = round(sum(s["lm_calls"] for s in steps.values()) / n, 3)
    res["s_per_input"] = round(wall / n, 2)
    res["load_avg_1m"] = {"start": load0[0], "end": load_now()[0]}
    res["weights"] = {"infer": program.infer_weight if program.infer is not None else None, "rank": program.rank_weight if program.rank is not None else None}
    res["steps"] = {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in s.items()} for k, s in steps.items() if s["inputs"]}
    rows = [
        {"text": ex.text, "gold": list(ex.labels), "guesses": list(o.guesses), "lm_labels": list(o.lm_labels), "top10": list(o.ranking[:10])}
        for ex, o in zip(examples[:5], outs[:5])
    ]
    return res, values, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", choices=["tech", "house"], default="tech")
    ap.add_argument("--config", default=None, help="default: eval/configs/esco_{benchmark}_dspy.yaml")
    ap.add_argument("--n", type=int, default=100, help="test sentences (seeded subset)")
    ap.add_argument("--lm", default=None, help="LM spec for both steps (default: the config's, smollm2)")
    ap.add_argument("--threads", type=int, default=8, help="sentences in flight (their Infer generations are batched)")
    ap.add_argument("--program-dir", default=None, help="default: runs/dspy_esco_{benchmark}[_LM]")
    ap.add_argument("--out", default=None, help="default: eval/results/dspy_esco_{benchmark}[_LM].json")
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. classifier.dspy.rank.rank_k=30")
    ap.add_argument("--reuse-compiled", action="store_true", help="load --program-dir instead of compiling")
    args = ap.parse_args()

    import yaml

    from iclcls.experiment import load_splits
    from iclcls.experiment.compile import load_compile_config
    from iclcls.io import atomic_write_json
    from iclcls.programs.dspy.compile import LMPool, build_program, compile_split, fit_retriever, load_compiled, optimize, save_compiled

    tag = "" if args.lm in (None, "smollm2") else "_" + args.lm.replace(":", "-").replace("/", "-")
    config = args.config or str(REPO / f"eval/configs/esco_{args.benchmark}_dspy.yaml")
    out_path = args.out or str(REPO / f"eval/results/dspy_esco_{args.benchmark}{tag}.json")
    program_dir = args.program_dir or str(REPO / f"runs/dspy_esco_{args.benchmark}{tag}")
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides["data.test_size"] = args.n
    overrides["classifier.dspy.optimizer.threads"] = args.threads
    if args.lm:
        overrides["classifier.dspy.infer.lm"] = overrides["classifier.dspy.rank.lm"] = args.lm
    cfg = load_compile_config(config, overrides=overrides)
    opts = cfg.classifier.dspy
    splits = load_splits(cfg.data)
    test = [ex for ex in splits.test if ex.labels]
    compile_train, compile_val = compile_split(splits.validation, opts.optimizer)
    result: dict = {
        "benchmark": splits.name,
        "n": len(test),
        "test_subset": {"size": len(test), "seed": cfg.data.seed},
        "compile_data": {"examples": len(compile_train) + len(compile_val), "from": "validation split"},
        "lm": {"infer": opts.infer.lm, "rank": opts.rank.lm},
        "options": json.loads(opts.model_dump_json()),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python eval/bench_dspy.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs, no GPU; load average (1 min) per stage below",
        "load_avg_at_start": load_now(),
    }

    def write() -> None:
        atomic_write_json(out_path, result)

    print(f"{splits.name}: {len(test)} test sentences; compile on {result['compile_data']['examples']} validation sentences; load {load_now()}")
    retriever = fit_retriever(opts.retrieve, splits.train, splits.labels, priors=splits.priors)
    lms = LMPool()
    values: dict = {}

    # retrieval alone: the same program without Infer and Rank
    bare = opts.model_copy(deep=True)
    bare.infer.enabled = bare.rank.enabled = False
    res, values["retrieve"], _ = run_program(build_program(bare, retriever), test, name="retrieve", threads=1)
    result["retrieve"] = {k: v for k, v in res.items() if k not in ("steps", "weights")}
    print("retrieve", result["retrieve"])
    write()

    program = build_program(opts, retriever, lms=lms)
    res, values["uncompiled"], rows = run_program(program, test, name="uncompiled", threads=args.threads)
    res["vs_retrieve"] = versus(values["uncompiled"], values["retrieve"])
    result["uncompiled"] = res
    result["examples_uncompiled"] = rows
    print("uncompiled", {k: v for k, v in res.items() if k != "steps"})
    write()

    if args.reuse_compiled:
        compiled = load_compiled(program_dir, lms=lms, retriever=retriever)
        result["compile"] = {"reused": program_dir, "decision": compiled.decision}
    else:
        student = build_program(opts, retriever, lms=lms, cache=opts.optimizer.cache)
        task_lm = student.rank._lm.value if student.rank is not None else None
        load0 = load_now()
        compiled, report = optimize(student, opts.optimizer, compile_train, compile_val, task_lm=task_lm, log=print)
        report["load_avg_1m"] = {"start": load0[0], "end": load_now()[0]}
        save_compiled(compiled, opts, program_dir, info={"report": report, "benchmark": splits.name})
        result["compile"] = report
        print("compile", json.dumps({k: v for k, v in report.items() if k != "decision"}), "\n", (report.get("decision") or {}).get("why"))
        write()
        compiled = load_compiled(program_dir, lms=lms, retriever=retriever)  # measure the reloaded program (its retriever is this one)
    res, values["compiled"], rows = run_program(compiled, test, name="compiled", threads=args.threads)
    res["vs_retrieve"] = versus(values["compiled"], values["retrieve"])
    res["vs_uncompiled"] = versus(values["compiled"], values["uncompiled"])
    result["compiled"] = res
    result["examples_compiled"] = rows
    result["load_avg_at_end"] = load_now()
    print("compiled", {k: v for k, v in res.items() if k != "steps"})
    write()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
