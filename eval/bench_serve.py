"""Load test of `iclcls serve`: a real uvicorn server on a BANKING77 state, on 127.0.0.1.

    .venv/bin/python eval/bench_serve.py [--duration 30] [--lm-duration 20] [--clients 1 4 16]
                                         [--skip-lm] [--threads 1] [--quick]
    .venv/bin/python eval/bench_serve.py --replicas 2 --store postgresql://USER@HOST:PORT/DB
                                         [--clients 8] [--duration 30] [--wait-load 2]

The second form (eval/bench_serve_replicas.py) measures 1..N replicas on one PostgreSQL store
while a class is added every second, and merges its rows (``replicas`` set) into the results.

For the retriever alone (kNN vote over the 10,003 BANKING77 training examples, no LM) and
with the embedded LM (SmolLM2-135M ranking a 5-class kNN shortlist with 4 kNN
demonstrations, fused with the retriever), C concurrent clients each send one BANKING77
test text per request, back to back, for a bounded time; the same again while a new class
(5 examples of a CLINC150 intent, unseen by the state) is added every second. With the LM
at the largest C, micro-batching is measured on and off side by side.

Each run starts a fresh server on a fresh copy of the state. Lost additions: acknowledged
additions missing from GET /v1/classes after the run, and again after `kill -9` and a
restart (the write-ahead log must bring every acknowledged class back).

Writes eval/results/bench_serve.json: one row per run with ``clients``, ``lm``, ``adding``,
``batching``, ``rps``, ``p50_ms``/``p95_ms``/``p99_ms`` (classify latency as the client
sees it), ``errors``, ``additions``, ``lost_additions``, ``lost_after_restart``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "eval" / "results" / "bench_serve.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_states(root: Path, data_dir: Path | None, *, with_lm: bool) -> dict[str, Path]:
    """The two fitted states (fitted once, reused by every run via a copy)."""
    from iclcls.data import load_benchmark
    from iclcls.programs import knn_fusion, retriever_only

    bench = load_benchmark("banking77", data_dir=data_dir)
    states = {"retriever": root / "retriever"}
    if not (states["retriever"] / "config.json").exists():
        retriever_only().fit(bench.train, labels=bench.labels, tune="none").save(states["retriever"])
    if with_lm:
        states["smollm2"] = root / "smollm2"
        if not (states["smollm2"] / "config.json").exists():
            clf = knn_fusion(lm="smollm2", shots=4, shortlist_k=5, show_progress=False)
            clf.fit(bench.train, labels=bench.labels, tune="none").save(states["smollm2"])
    return states


def new_classes(data_dir: Path | None, per_class: int = 5) -> list[tuple[str, list[str]]]:
    """CLINC150 intents (none is a BANKING77 class), ``per_class`` training texts each."""
    from iclcls.data import load_benchmark

    by: dict[str, list[str]] = {}
    for ex in load_benchmark("clinc150", data_dir=data_dir).train:
        by.setdefault(f"clinc_{ex.label}", []).append(ex.text)
    return [(lab, texts[:per_class]) for lab, texts in sorted(by.items()) if len(texts) >= per_class]


class Server:
    def __init__(self, state: Path, args: list[str], env: dict[str, str], log: Path) -> None:
        self.state, self.args, self.env, self.log_path = state, args, env, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "iclcls.cli", "serve", "--state", str(state), "--port", str(self.port),
               "--log-level", "warning", *args]
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.started = time.time()

    def wait_ready(self, timeout: float = 600) -> float:
        import httpx

        while time.time() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.time() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready in {timeout} s; see {self.log_path}")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def load(url: str, texts: list[str], *, clients: int, duration: float, adds: list | None, seed: int) -> dict:
    """C clients back to back for ``duration`` s; optionally one addition per second."""
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    acked: list[str] = []
    add_lat: list[float] = []
    t_start = time.perf_counter()
    t_end = t_start + duration
    last_done = [t_start]

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/classify", json={"texts": [rng.choice(texts)], "top_k": 5})
                ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                if not ok:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                ok = False
            t1 = time.perf_counter()
            if ok:
                lat.append(t1 - t0)
            last_done[0] = max(last_done[0], t1)

    async def adder(http: httpx.AsyncClient) -> None:
        for k, (label, examples) in enumerate(adds or []):
            due = t_start + k + 0.5
            if due >= t_end:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/classes", json={"examples": [{"text": t, "label": label} for t in examples]})
                if r.status_code == 200:
                    acked.append(label)
                    add_lat.append(time.perf_counter() - t0)
                else:
                    errors.append(f"add {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"add {type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        tasks = [client(i, http) for i in range(clients)] + ([adder(http)] if adds else [])
        await asyncio.gather(*tasks)
    wall = last_done[0] - t_start
    return {
        "requests": len(lat),
        "wall_s": round(wall, 2),
        "rps": round(len(lat) / wall, 2) if wall > 0 else 0.0,
        "p50_ms": _ms(_pct(lat, 50)),
        "p95_ms": _ms(_pct(lat, 95)),
        "p99_ms": _ms(_pct(lat, 99)),
        "errors": len(errors),
        "error_examples": errors[:3],
        "acked": acked,
        "add_p50_ms": _ms(_pct(add_lat, 50)),
        "add_max_ms": _ms(max(add_lat) if add_lat else None),
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _missing(url: str, acked: list[str], per_class: int) -> int:
    import httpx

    counts = {c["label"]: c["examples"] for c in httpx.get(url + "/v1/classes", timeout=60).json()["classes"]}
    return sum(counts.get(lab) != per_class for lab in acked)


def _remove_store(store: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        store.with_name(store.name + suffix).unlink(missing_ok=True)
    shutil.rmtree(store.with_name(store.name + ".snapshots"), ignore_errors=True)


def run_one(state: Path, work: Path, *, name: str, clients: int, lm: str | None, adding: bool, batching: bool,
            duration: float, texts: list[str], adds: list, env: dict, restart_check: bool, seed: int) -> dict:
    copy = work / f"state-{name}"
    store = work / f"store-{name}.sqlite"  # a fresh store of additions per run, outside the state
    _remove_store(store)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns("serve"))
    args = ["--store", str(store)] + ([] if batching else ["--no-batching"]) + (["--lm", lm] if lm else [])
    log = work / f"{name}.log"
    srv = Server(copy, args, env, log)
    load_avg = os.getloadavg()[0]
    try:
        startup = srv.wait_ready()
        res = asyncio.run(load(srv.url, texts, clients=clients, duration=duration, adds=adds if adding else None, seed=seed))
        lost = _missing(srv.url, res["acked"], 5) if adding else 0
        lost_restart = None
        if adding and restart_check:
            srv.kill9()
            srv = Server(copy, args, env, log)
            srv.wait_ready()
            lost_restart = _missing(srv.url, res["acked"], 5)
    finally:
        srv.stop()
        shutil.rmtree(copy, ignore_errors=True)
        _remove_store(store)
    row = {
        "clients": clients,
        "lm": lm or "none",
        "adding": adding,
        "batching": batching,
        "duration_s": duration,
        **{k: v for k, v in res.items() if k != "acked"},
        "additions": len(res["acked"]),
        "lost_additions": lost,
        "lost_after_restart": lost_restart,
        "startup_s": round(startup, 1),
        "load_average_1min": round(load_avg, 2),
    }
    print(
        f"{row['lm']:>8} C={clients:<3} adding={str(adding):5} batching={str(batching):5} "
        f"rps {row['rps']:7.2f}  p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  p99 {row['p99_ms']} ms  "
        f"errors {row['errors']}  additions {row['additions']} lost {lost}/{lost_restart}  load {load_avg:.1f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per retriever-only run")
    ap.add_argument("--lm-duration", type=float, default=20.0, help="seconds per run with the LM")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="OMP/BLAS threads in the server (1: the shared-machine convention)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="folder for the fitted states and logs (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="3-second runs at C=1,4, no restart check: a smoke test")
    ap.add_argument("--skip-retriever", action="store_true", help="only the runs with the LM")
    ap.add_argument("--adding-only", action="store_true", help="only the runs with additions")
    ap.add_argument("--merge", action="store_true", help="replace matching rows of an existing --out, keep the rest")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--replicas", type=int, default=None, help="measure 1..N replicas on --store (PostgreSQL)")
    ap.add_argument("--store", default=None, help="with --replicas: postgresql://USER@HOST:PORT/DB (a database per "
                    "run is created on that server and dropped after)")
    ap.add_argument("--wait-load", type=float, default=None, help="wait (up to 15 min) for the 1-min load under this")
    a = ap.parse_args()
    if a.replicas:
        replica_main(a)
        return
    if a.quick:
        a.duration = a.lm_duration = 3.0
        a.clients = [1, 4]
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_serve."))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{v: str(a.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    t0 = time.time()
    states = build_states(work, a.data_dir, with_lm=not a.skip_lm)
    print(f"states ready in {time.time() - t0:.0f} s: {', '.join(map(str, states.values()))}", flush=True)
    from iclcls.data import load_benchmark

    texts = [ex.text for ex in load_benchmark("banking77", data_dir=a.data_dir).test]
    adds = new_classes(a.data_dir)
    rows = []
    plan = [] if a.skip_retriever else [("retriever", None, c, adding, True, a.duration) for c in a.clients for adding in (False, True)]
    if not a.skip_lm:
        plan += [("smollm2", "smollm2", c, adding, True, a.lm_duration) for c in a.clients for adding in (False, True)]
        plan.append(("smollm2", "smollm2", max(a.clients), False, False, a.lm_duration))
    if a.adding_only:
        plan = [p for p in plan if p[3]]
    for k, (state_key, lm, c, adding, batching, dur) in enumerate(plan):
        name = f"{state_key}-c{c}-{'add' if adding else 'noadd'}-{'batch' if batching else 'nobatch'}"
        rows.append(run_one(states[state_key], work, name=name, clients=c, lm=lm, adding=adding, batching=batching,
                            duration=dur, texts=texts, adds=adds, env=env, restart_check=not a.quick, seed=k))
    if a.merge and a.out.exists():
        key = lambda r: (r["clients"], r["lm"], r["adding"], r["batching"])  # noqa: E731
        fresh = {key(r) for r in rows}
        rows = [r for r in json.loads(a.out.read_text())["rows"] if key(r) not in fresh] + rows
        rows.sort(key=lambda r: (r["lm"] != "none", not r["batching"], r["clients"], r["adding"]))
    top = max([r["clients"] for r in rows if r["lm"] != "none" and not r["batching"]], default=max(a.clients))
    lm_rows = {r["batching"]: r for r in rows if r["lm"] != "none" and r["clients"] == top and not r["adding"]}
    speedup = (lm_rows[True]["rps"] / lm_rows[False]["rps"]) if len(lm_rows) == 2 and lm_rows[False]["rps"] else None
    import torch

    out = {
        "benchmark": "bench_serve",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "server_threads": a.threads,
        },
        "notes": (
            "one server per run on a fresh copy of the state; clients send one BANKING77 test text per request back "
            "to back from one asyncio process on the same machine; adding: one CLINC150 intent (5 examples) per second; "
            "lost_after_restart: acknowledged classes missing after kill -9 and a restart; the retriever state is kNN "
            "vote over all 10,003 BANKING77 training texts; the LM state is knn_fusion (SmolLM2-135M, 4 shots, "
            "shortlist 5, fusion weight untuned) over the same pool"
        ),
        "lm_batching_speedup_at_max_clients": None if speedup is None else round(speedup, 2),
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out} ({len(rows)} runs, {time.time() - t0:.0f} s); LM micro-batching speedup at "
          f"C={top}: {out['lm_batching_speedup_at_max_clients']}")


def replica_main(a: argparse.Namespace) -> None:
    """The replica runs (see eval/bench_serve_replicas.py); rows merged into --out."""
    from bench_serve_replicas import run_replicas, wait_for_load

    if not a.store or not a.store.startswith("postgresql://"):
        raise SystemExit("--replicas needs --store postgresql://USER@HOST:PORT/DB")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_serve."))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{v: str(a.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    states = build_states(work, a.data_dir, with_lm=False)
    from iclcls.data import load_benchmark

    texts = [ex.text for ex in load_benchmark("banking77", data_dir=a.data_dir).test]
    adds = new_classes(a.data_dir)
    clients = max(a.clients) if a.clients != [1, 4, 16] else 8
    rows = []
    for r in range(1, a.replicas + 1):
        if a.wait_load is not None:
            print(f"load before the run: {wait_for_load(a.wait_load, 900):.2f}", flush=True)
        rows.append(run_replicas(state=states["retriever"], work=work, server_cls=Server, store=a.store, replicas=r,
                                 clients=clients, duration=a.duration, texts=texts, adds=adds, env=env, seed=r))
    old = json.loads(a.out.read_text()) if a.out.exists() else {"benchmark": "bench_serve", "rows": []}
    old["rows"] = [row for row in old["rows"] if "replicas" not in row] + rows
    old["replica_notes"] = (
        "replicas rows: R `iclcls serve` processes on one PostgreSQL store (retriever state, kNN vote over 10,003 "
        "BANKING77 texts) on this one machine, C clients round-robin over them, one CLINC150 class added per second "
        "to the replicas in turn; visibility: acknowledgement on one replica to its seq on another (healthz polled "
        "every 5 ms); load_average_1min: at the run's start (the machine is shared)"
    )
    a.out.write_text(json.dumps(old, indent=2) + "\n")
    print(f"merged {len(rows)} replica rows into {a.out}")


if __name__ == "__main__":
    main()
