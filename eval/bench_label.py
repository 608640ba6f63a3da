"""Labelling a corpus: throughput, peak memory, resume cost, and the Ray engine.

    .venv/bin/python eval/bench_label.py [--rss-rows 1000 10000 100000] [--no-ray]

Every measurement runs in its own subprocess (start-up, imports and model load included in
its wall time; peak RSS from ``wait4``'s ``ru_maxrss``), with an empty embedding cache
unless said otherwise, on BANKING77 test (3,080 rows), retriever only (a state fitted on
the 10-shot pool, shortlist of 10):

- ``label``: ``iclcls label test.jsonl --state S --out OUT`` (the new streaming path);
- ``predict`` (the pre-change behaviour, emulated): read every row into memory with
  ``load_examples``, ``clf.predict_detailed(all)`` at the state's batch size (16 texts per embedder
  call), then JSON lines and one atomic write at the end -- what ``iclcls
  predict`` did before ``label`` replaced it;
- ``embed``: the embedder alone on the same texts (no cache), model load included;
- ``rss_mb``: ``iclcls label`` on 10^3/10^4/10^5 rows cycling over the unique BANKING77
  train+test sentences; one embedding cache shared by the three runs in increasing order
  (so each run embeds only sentences the smaller runs did not: the 10^5 run embeds ~3k and
  reads the rest from the cache);
- ``resume``: the label command killed (SIGKILL) once OUT holds about half the rows, then
  the same command again; ids checked (none twice, none missing) and the two runs' total
  time compared with the uninterrupted ``label`` run;
- ``ray_rows_per_s``: ``iclcls label --engine ray --workers N`` (a local Ray instance that
  the command starts, its start-up included).

Prints a table and writes eval/results/bench_label.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results" / "bench_label.json"
sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    for cand in (os.environ.get("ICLCLS_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set ICLCLS_DATA or put it at ../shared/data")


def banking_texts(split: str) -> list[str]:
    with open(data_dir() / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def run(cmd: list[str], *, cache: Path, kill_when=None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (MB), return code. ``kill_when()`` polled: SIGKILL when true."""
    env = {**os.environ, "ICLCLS_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    if kill_when is not None:
        while p.poll() is None:
            if kill_when():
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode("utf-8", "replace") if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 and not killed:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{err[-3000:]}")
    return {"seconds": wall, "rss_mb": usage.ru_maxrss / 1024, "rc": rc, "killed": killed}


def label_cmd(src: Path, state: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "iclcls.cli", "label", str(src), "--state", str(state), "--out", str(out), "--quiet", *extra]


WORKER = {
    "predict": """
import json, sys
from iclcls.classifier import ICLClassifier
from iclcls.data import load_examples
from iclcls.io import atomic_write_text
clf = ICLClassifier.load(sys.argv[1])
examples = load_examples(sys.argv[2], text_field="text", label_field=None)
atomic_write_text(sys.argv[3], "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\\n" for p in clf.predict_detailed(examples, show_progress=False)))
""",
    "embed": """
import json, sys
from iclcls.embed import default_embedder
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
default_embedder(cache=False).encode(texts, show_progress=False)
""",
}


def ids_of(out: Path) -> list:
    return [json.loads(x)["id"] for x in out.read_text(encoding="utf-8").splitlines() if x.strip()]


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rss-rows", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--rows", type=int, default=None, help="use only the first N test rows (a smoke run)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_label."))
    work.mkdir(parents=True, exist_ok=True)
    fresh = iter(range(10**6))

    def new_cache() -> Path:
        d = work / f"cache{next(fresh)}"
        d.mkdir()
        return d

    from iclcls.data import load_benchmark
    from iclcls.programs import retriever_only

    state = work / "state"
    if not (state / "config.json").exists():
        train = load_benchmark("banking77_10shot", data_dir=data_dir()).train
        retriever_only(shortlist_k=10).fit(train).save(state)
    test = banking_texts("test")[: args.rows]
    src = write_jsonl(work / "test.jsonl", test)
    n = len(test)
    res: dict = {"rows": n, "chunk_rows": 256, "work": str(work)}
    target = RESULTS if args.rows is None else work / "bench_label.json"

    def save() -> None:  # after every section, so a stopped run keeps what it measured
        res["command"] = "python eval/bench_label.py " + " ".join(sys.argv[1:])
        res["total_s"] = time.perf_counter() - t_start
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(res, indent=2) + "\n")

    def report(name: str, r: dict, rows: int) -> None:
        print(f"{name:<28} {rows:>7} rows {r['seconds']:8.1f} s {rows / r['seconds']:8.1f} rows/s  peak RSS {r['rss_mb']:7.0f} MB", flush=True)

    # throughput: label vs the old predict vs the embedder alone (empty caches)
    out = work / "label.jsonl"
    lab = run(label_cmd(src, state, out), cache=new_cache())
    ids = ids_of(out)
    assert ids == list(range(n)), "label output ids"
    report("label (local)", lab, n)
    old = run([sys.executable, "-c", WORKER["predict"], str(state), str(src), str(work / "predict.jsonl")], cache=new_cache())
    report("predict (pre-change path)", old, n)
    emb = run([sys.executable, "-c", WORKER["embed"], str(src)], cache=new_cache())
    report("embedder alone", emb, n)
    res.update(
        label_rows_per_s=n / lab["seconds"],
        predict_rows_per_s=n / old["seconds"],
        embed_rows_per_s=n / emb["seconds"],
        seconds={"label": lab["seconds"], "predict": old["seconds"], "embed": emb["seconds"]},
        peak_rss_mb_3080={"label": lab["rss_mb"], "predict": old["rss_mb"], "embed": emb["rss_mb"]},
        output_bytes={"label": out.stat().st_size, "predict": (work / "predict.jsonl").stat().st_size},
    )
    res["embed_over_label"] = res["embed_rows_per_s"] / res["label_rows_per_s"]
    res["label_over_predict"] = res["label_rows_per_s"] / res["predict_rows_per_s"]
    save()

    # resume: kill at about half, run again
    rout = work / "resume.jsonl"
    cache = new_cache()
    first = run(label_cmd(src, state, rout), cache=cache, kill_when=lambda: count_lines(rout) >= n // 2)
    at_kill = count_lines(rout)
    second = run(label_cmd(src, state, rout), cache=cache)
    rids = ids_of(rout)
    total = first["seconds"] + second["seconds"]
    res["resume"] = {
        "killed_after_rows": at_kill,
        "killed": first["killed"],
        "first_s": first["seconds"],
        "resume_s": second["seconds"],
        "total_s": total,
        "uninterrupted_s": lab["seconds"],
        "total_over_uninterrupted": total / lab["seconds"],
        "rows": len(rids),
        "duplicates": len(rids) - len(set(rids)),
        "missing": len(set(range(n)) - set(rids)),
    }
    print(f"resume: killed at {at_kill} rows; {first['seconds']:.1f} s + {second['seconds']:.1f} s = {total:.1f} s "
          f"({total / lab['seconds']:.2f}x uninterrupted); duplicates {res['resume']['duplicates']}, "
          f"missing {res['resume']['missing']}", flush=True)
    save()

    # Ray engine, 1 and 2 workers
    if not args.no_ray:
        res["ray_rows_per_s"] = {}
        res["ray_seconds"] = {}
        for w in args.workers:
            rout = work / f"ray{w}.jsonl"
            r = run(label_cmd(src, state, rout, "--engine", "ray", "--workers", str(w)), cache=new_cache())
            assert ids_of(rout) == list(range(n)), f"ray {w} ids"
            res["ray_rows_per_s"][str(w)] = n / r["seconds"]
            res["ray_seconds"][str(w)] = r["seconds"]
            report(f"ray, {w} worker(s)", r, n)
            save()

    # peak RSS at growing row counts (one cache shared, increasing order)
    pool = list(dict.fromkeys(banking_texts("train") + test))
    cache = new_cache()
    res["rss_mb"] = {}
    res["rss_seconds"] = {}
    res["rss_pool_unique_texts"] = len(pool)
    for rows in sorted(args.rss_rows):
        big = write_jsonl(work / f"rss{rows}.jsonl", [pool[i % len(pool)] for i in range(rows)])
        r = run(label_cmd(big, state, work / f"rss{rows}.out.jsonl"), cache=cache)
        res["rss_mb"][str(rows)] = r["rss_mb"]
        res["rss_seconds"][str(rows)] = r["seconds"]
        report("rss run", r, rows)
        save()
        big.unlink()
        (work / f"rss{rows}.out.jsonl").unlink()
    if len(res["rss_mb"]) >= 2:
        ks = sorted(res["rss_mb"], key=int)
        res["rss_largest_over_smallest"] = res["rss_mb"][ks[-1]] / res["rss_mb"][ks[0]]

    import torch

    res["env"] = {
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    save()
    print(f"label {res['label_rows_per_s']:.1f} rows/s | predict {res['predict_rows_per_s']:.1f} | "
          f"embedder {res['embed_rows_per_s']:.1f} (embedder/label {res['embed_over_label']:.2f}x) -> {target}")


if __name__ == "__main__":
    main()
