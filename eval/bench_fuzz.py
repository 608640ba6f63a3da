"""The fuzzing properties of tests/test_fuzz.py with many more cases than CI runs.

Runs pytest on tests/test_fuzz.py with ``ICLCLS_FUZZ_EXAMPLES`` cases per property, counts
the cases each property ran, and writes eval/results/bench_fuzz.json with the counts, the
outcome and the crashes fuzzing found (each fixed, and kept as a regression by the tests).

    .venv/bin/python eval/bench_fuzz.py [--examples 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "eval" / "results" / "bench_fuzz.json"

# What fuzzing found in iclcls while these properties were written (issue 11), and the fix.
FOUND = [
    {
        "where": "iclcls/data/tables.py (_read_json)",
        "input": 'a JSONL record whose text holds U+2028 (or U+0085, \\x1c-\\x1e) unescaped, e.g. {"text": "0\\u2028"}',
        "failure": "DataError 'not valid JSON: Unterminated string': str.splitlines() broke the record in two; a valid file was rejected",
        "fix": "split lines on '\\n' only",
    },
    {
        "where": "iclcls/data/tables.py (_read_delimited)",
        "input": "a CSV cell over 131,072 characters",
        "failure": "DataError 'field larger than field limit (131072)': a valid file was rejected",
        "fix": "raise csv.field_size_limit",
    },
    {
        "where": "iclcls/pool.py (Pool.load) via ICLClassifier.load",
        "input": "a pool example whose text holds U+2028 (saved raw by json.dumps(ensure_ascii=False))",
        "failure": "ValueError 'bad example' on load: a saved state could not be read back",
        "fix": "split examples.jsonl on '\\n' only",
    },
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300, help="cases per property")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "counts.jsonl"
        env = {**os.environ, "ICLCLS_FUZZ_EXAMPLES": str(args.examples), "ICLCLS_FUZZ_REPORT": str(report),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={args.seed}",
               str(REPO / "tests" / "test_fuzz.py")]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        counts: Counter[str] = Counter()
        if report.exists():
            for line in report.read_text().splitlines():
                counts.update(json.loads(line))
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    failures = re.findall(r"^FAILED (\S+)", res.stdout, flags=re.M)
    result = {
        "command": " ".join(["python", "eval/bench_fuzz.py", f"--examples {args.examples}", f"--seed {args.seed}"]),
        "examples_per_property": args.examples,
        "seed": args.seed,
        "cases_run": dict(sorted(counts.items())),
        "cases_total": int(sum(counts.values())),
        "tests_passed": passed,
        "tests_failed": failed,
        "failing_tests": failures,
        "crashes_found": len(FOUND) + len(failures),
        "crashes_fixed": len(FOUND),
        "found": FOUND,
        "seconds": round(seconds, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"{'property':32s} {'cases':>7s}")
    for name, n in sorted(counts.items()):
        print(f"{name:32s} {n:7d}")
    print(f"{'total':32s} {result['cases_total']:7d}")
    print(f"tests: {passed} passed, {failed} failed in {seconds:.0f} s; crashes found {result['crashes_found']}, "
          f"fixed {result['crashes_fixed']}; wrote {OUT.relative_to(REPO)}")
    if failed:
        print(res.stdout[-4000:])
        sys.exit(1)


if __name__ == "__main__":
    main()
