"""`eval/bench_serve.py --replicas N --store postgresql://...`: the service as 1..N replicas on one
PostgreSQL store, on this machine.

For R in 1..N: a fresh database on the given server, R `iclcls serve` processes on the same
state and store, C clients spread round-robin over the replicas (one BANKING77 test text per
request, back to back) while one class (5 CLINC150 examples) is added every second, to the
replicas in turn, each under its own Idempotency-Key. A watcher polls every replica's
``/healthz`` seq every 5 ms: visibility is the time from an addition's acknowledgement on one
replica to its seq on each other one. Afterwards: additions lost (acknowledged, missing from
the store or from a replica's classes) and doubled (a label in two records, or with more than
its 5 examples on a replica).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def fresh_database(url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server of ``url``; the URL of the new database."""
    from urllib.parse import urlsplit

    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    return urlsplit(url)._replace(path="/" + name).geturl()


def drop_database(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _load(urls: list[str], texts: list[str], adds: list, *, clients: int, duration: float, seed: int) -> dict:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    acked: list[tuple[str, int, float, int]] = []  # label, seq, ack time, replica index
    seen: list[dict[int, float]] = [dict() for _ in urls]  # per replica: seq -> first time seen
    t_start = time.perf_counter()
    t_end = t_start + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng, url = random.Random(seed * 1000 + i), urls[i % len(urls)]
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/classify", json={"texts": [rng.choice(texts)], "top_k": 5})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    async def adder(http: httpx.AsyncClient) -> None:
        for k, (label, examples) in enumerate(adds):
            due = t_start + k + 0.5
            if due >= t_end - 1.0:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            j = k % len(urls)
            body = {"examples": [{"text": t, "label": label} for t in examples]}
            try:
                r = await http.post(urls[j] + "/v1/classes", json=body, headers={"Idempotency-Key": f"bench-{label}"})
                if r.status_code == 200:
                    acked.append((label, int(r.json()["seq"]), time.perf_counter(), j))
                else:
                    errors.append(f"add {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"add {type(e).__name__}: {e}")

    async def watcher(j: int, http: httpx.AsyncClient) -> None:
        last = -1
        while time.perf_counter() < t_end + 2.0:
            try:
                seq = (await http.get(urls[j] + "/healthz")).json()["seq"]
                now = time.perf_counter()
                for s in range(last + 1, seq + 1):
                    seen[j].setdefault(s, now)
                last = max(last, seq)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.005)

    limits = httpx.Limits(max_connections=clients + 4 + len(urls), max_keepalive_connections=clients + 4 + len(urls))
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        tasks = [client(i, http) for i in range(clients)] + [adder(http)]
        tasks += [watcher(j, http) for j in range(len(urls))] if len(urls) > 1 else []
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t_start
    visible = [seen[j][seq] - t_ack for (_, seq, t_ack, origin) in acked for j in range(len(urls))
               if j != origin and seq in seen[j]]
    not_seen = sum(1 for (_, seq, _, origin) in acked for j in range(len(urls)) if j != origin and seq not in seen[j])
    return {"lat": lat, "errors": errors, "acked": acked, "visible": [max(0.0, v) for v in visible],
            "not_seen": not_seen, "wall": min(wall, duration)}


def _lost_and_doubled(store_url: str, replica_urls: list[str], acked: list[tuple[str, int, float, int]], per_class: int
                      ) -> tuple[int, int]:
    import httpx
    import psycopg

    with psycopg.connect(store_url) as c:
        keys = [k for (k,) in c.execute("SELECT idempotency_key FROM iclcls_additions").fetchall()]
    labels = [lab for (lab, _, _, _) in acked]
    lost = sum(f"bench-{lab}" not in keys for lab in labels)
    doubled = len(keys) - len(set(keys))
    for url in replica_urls:
        counts = {c["label"]: c["examples"] for c in httpx.get(url + "/v1/classes", timeout=60).json()["classes"]}
        lost += sum(counts.get(lab, 0) < per_class for lab in labels)
        doubled += sum(counts.get(lab, 0) > per_class for lab in labels)
    return lost, doubled


def run_replicas(*, state: Path, work: Path, server_cls: Any, store: str, replicas: int, clients: int,
                 duration: float, texts: list[str], adds: list, env: dict, seed: int = 0) -> dict:
    """One measured run with ``replicas`` servers on a fresh database of ``store``'s server."""
    import httpx

    db = f"iclcls_bench_r{replicas}_{os.getpid()}"
    url = fresh_database(store, db)
    servers = []
    load_avg = os.getloadavg()[0]
    try:
        for r in range(replicas):
            servers.append(server_cls(state, ["--store", url, "--follow-poll-s", "1.0"], env, work / f"replica{r}.log"))
        startup = max(s.wait_ready() for s in servers)
        res = asyncio.run(_load([s.url for s in servers], texts, adds, clients=clients, duration=duration, seed=seed))
        head = max((seq for (_, seq, _, _) in res["acked"]), default=0)
        deadline = time.time() + 10
        while any(httpx.get(s.url + "/healthz").json()["seq"] < head for s in servers) and time.time() < deadline:
            time.sleep(0.1)
        lost, doubled = _lost_and_doubled(url, [s.url for s in servers], res["acked"], len(adds[0][1]))
    finally:
        for s in servers:
            s.stop()
        drop_database(store, db)
    lat, vis = res["lat"], res["visible"]
    row = {
        "replicas": replicas, "clients": clients, "lm": "none", "adding": True, "batching": True,
        "store": "postgresql", "duration_s": duration,
        "requests": len(lat), "rps": round(len(lat) / res["wall"], 2),
        "p50_ms": _ms(_pct(lat, 50)), "p99_ms": _ms(_pct(lat, 99)),
        "errors": len(res["errors"]), "error_examples": res["errors"][:3],
        "additions": len(res["acked"]), "lost_additions": lost, "doubled_additions": doubled,
        "visibility_p50_ms": _ms(_pct(vis, 50)), "visibility_p99_ms": _ms(_pct(vis, 99)),
        "visibility_max_ms": _ms(max(vis) if vis else None), "visibility_samples": len(vis),
        "never_visible": res["not_seen"], "startup_s": round(startup, 1), "load_average_1min": round(load_avg, 2),
    }
    print(f"replicas={replicas} C={clients} rps {row['rps']:.2f} p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms "
          f"errors {row['errors']} additions {row['additions']} lost {lost} doubled {doubled} visibility p50 "
          f"{row['visibility_p50_ms']} ms p99 {row['visibility_p99_ms']} ms load {load_avg:.1f}", flush=True)
    return row


def wait_for_load(limit: float, max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) for the 1-minute load average to fall under ``limit``; the load then."""
    t0 = time.time()
    while os.getloadavg()[0] >= limit and time.time() - t0 < max_wait_s:
        time.sleep(15)
    return os.getloadavg()[0]
