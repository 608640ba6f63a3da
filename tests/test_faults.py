"""Fault injection with real processes on loopback, each bounded in time.

- an LM server that answers slowly: the per-request timeout holds and the error names the URL;
- the disk failing during ``save`` (a file-size limit in a child process, a failing fsync,
  a failing final rename, a process killed mid-save): the previous state is intact and loads;
- a vLLM server killed in the middle of ``iclcls eval``: the run stops with a message that
  names the URL, and the re-run resumes without recomputing a finished example;
- a selector that gives fewer demonstrations than asked says so (once) and in the trace.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from iclcls import Example, ICLClassifier
from iclcls.data import load_benchmark
from iclcls.lm.openai_compat import OpenAICompatibleLM, ServerError
from iclcls.lm.server import free_port
from iclcls.programs import retriever_only

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STUB = HERE / "stub_openai_server.py"


@pytest.fixture(scope="module")
def sample():
    return load_benchmark("sample")


def start_stub(port: int, *, log: Path | None = None, delay: float = 0.0, model: str = "stub") -> subprocess.Popen:
    cmd = [sys.executable, str(STUB), "--port", str(port), "--delay", str(delay), "--model", model]
    if log is not None:
        cmd += ["--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    line = proc.stdout.readline().decode()
    assert line.startswith("ready"), line
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- a slow server ---------------------------------------------------------------------------


def test_slow_server_hits_the_per_request_timeout_and_names_the_url(sample):
    port = free_port()
    proc = start_stub(port, delay=30.0)
    try:
        url = f"http://127.0.0.1:{port}"
        lm = OpenAICompatibleLM(url, "stub", timeout=0.5, max_retries=1, context_window=2048)
        start = time.perf_counter()
        with pytest.raises(ServerError, match=rf"{url}/v1/completions: timed out after 0.5 s per request \(2 attempts\)"):
            lm.generate(["Hello"], max_tokens=2)
        elapsed = time.perf_counter() - start
        assert elapsed < 10, elapsed  # 2 x 0.5 s + backoff, not the server's 30 s
        # The same through a classifier: the error reaches the caller, nothing is made up.
        clf = ICLClassifier(lm=lm, rank="generative", shots=1, shortlist_k=3).fit(sample.train)
        with pytest.raises(ServerError, match=rf"{url}/tokenize: timed out"):
            clf.predict_detailed(["I lost my card"])
    finally:
        stop(proc)


# -- disk faults during save -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(sample):
    return retriever_only(shortlist_k=3).fit(sample.train)


def _same_state(d: Path, clf: ICLClassifier, sample) -> None:
    again = ICLClassifier.load(d)
    assert len(again.pool_) == len(clf.pool_)
    a, b = clf.predict_detailed(sample.test), again.predict_detailed(sample.test)
    assert [x.labels for x in a] == [x.labels for x in b]


def _no_temp_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


def _bigger(sample) -> ICLClassifier:
    more = [Example(f"{e.text} (variant {i})", e.labels) for i in range(4) for e in sample.train]
    return retriever_only(shortlist_k=3).fit(more)


def test_failing_fsync_during_save_keeps_the_previous_state(fitted, sample, tmp_path, monkeypatch):
    import iclcls.io as io

    d = tmp_path / "state"
    fitted.save(d)
    real, calls = io.fsync_file, []

    def full_disk(path):
        calls.append(path)
        if len(calls) == 3:  # the third file written: ENOSPC when its data reaches the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(io, "fsync_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _bigger(sample).save(d)
    monkeypatch.undo()
    _same_state(d, fitted, sample)
    _no_temp_left(tmp_path)


def test_failing_final_rename_keeps_the_previous_state(fitted, sample, tmp_path, monkeypatch):
    import iclcls.io as io

    d = tmp_path / "state"
    fitted.save(d)
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # the portable two-rename path
    real, failed = os.replace, []

    def failing(src, dst):
        if Path(dst) == d and not failed:  # the new state's rename into place fails (once)
            failed.append(src)
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="Read-only"):
        _bigger(sample).save(d)
    monkeypatch.undo()
    _same_state(d, fitted, sample)
    _no_temp_left(tmp_path)


CHILD_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
from iclcls import Example
from iclcls.data import load_benchmark
from iclcls.programs import retriever_only
s = load_benchmark("sample")
clf = retriever_only(shortlist_k=3).fit([Example(f"{e.text} ({i})", e.labels) for i in range(4) for e in s.train])
resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))  # the disk is "full" at 32 KiB a file
try:
    clf.save(sys.argv[1])
except OSError as e:
    print("save failed:", e.errno, e)
    sys.exit(3)
print("saved")
"""


def test_file_size_limit_in_a_child_process_keeps_the_previous_state(fitted, sample, tmp_path):
    d = tmp_path / "state"
    fitted.save(d)
    res = subprocess.run(
        [sys.executable, "-c", CHILD_FSIZE, str(d)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert "save failed:" in res.stdout  # EFBIG, or numpy's short-write error
    _same_state(d, fitted, sample)
    _no_temp_left(tmp_path)


CHILD_KILL_SAVES = """
import json, os, random, signal, sys, time
from iclcls import Example, ICLClassifier
from iclcls.data import load_benchmark
from iclcls.programs import retriever_only
d, kills = sys.argv[1], int(sys.argv[2])
s = load_benchmark("sample")
a = retriever_only(shortlist_k=3).fit(s.train, tune="none")
b = retriever_only(shortlist_k=3).fit([Example(f"{e.text} ({i})", e.labels) for i in range(3) for e in s.train], tune="none")
a.save(d)
rng, sizes = random.Random(0), []
for _ in range(kills):  # one start pays for every kill: the saver is a fork of this process
    pid = os.fork()
    if pid == 0:
        while True:
            a.save(d)
            b.save(d)
    time.sleep(rng.uniform(0.1, 1.0))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sizes.append(len(ICLClassifier.load(d, embedder=a.embedder_).pool_))  # old or new, never half
print(json.dumps({"sizes": sizes, "a": len(a.pool_), "b": len(b.pool_)}))
"""


def test_process_killed_at_random_points_of_saving_leaves_a_loadable_state(tmp_path):
    d = tmp_path / "state"
    res = subprocess.run(
        [sys.executable, "-c", CHILD_KILL_SAVES, str(d), "5"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["sizes"]) == 5 and set(out["sizes"]) <= {out["a"], out["b"]}
    _no_temp_left_but_old_swaps(tmp_path)
    print(f"\n[faults] killed a saving process 5 times; the state loaded every time ({out['sizes']})")


def _no_temp_left_but_old_swaps(parent: Path) -> None:
    """A kill may leave a temporary folder beside the state (never inside it); the state is whole."""
    assert (parent / "state" / "config.json").is_file()


# -- an honest selector ---------------------------------------------------------------------------


def test_dpp_short_of_k_warns_once_and_records_it_in_the_trace(embedder):
    from iclcls.pool import Pool
    from iclcls.select import get_selector
    from iclcls.types import Query

    p = Pool(embedder)
    texts = ["card arrived broken", "transfer is pending", "what is the exchange rate"]
    p.extend([Example(t, (f"c{i}",)) for i, t in enumerate(texts) for _ in range(4)])
    sel = get_selector("dpp", restrict_to_candidates=False).fit(p)
    qs = [Query(Example(t), e) for t, e in zip(["my card came damaged", "fx rate?"], embedder.encode(["my card came damaged", "fx rate?"]))]
    with pytest.warns(RuntimeWarning, match="dpp selector returned 3 of 8 demonstrations") as rec:
        out = sel.select(qs, [None, None], 8)
    assert len([w for w in rec if "dpp selector" in str(w.message)]) == 1  # once, not per query
    assert [len(ids) for ids in out] == [3, 3]
    for q in qs:
        assert q.trace["select_short"]["asked"] == 8 and q.trace["select_short"]["got"] == 3
        assert "marginal gain" in q.trace["select_short"]["why"]


# -- a vLLM server killed in the middle of `iclcls eval` (slow: one server start) ----------------------


def _eval_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "iclcls.cli", "eval", str(cfg), "--out", str(out), "--quiet"]


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_vllm_server_killed_mid_eval_stops_clearly_and_the_rerun_resumes(smollm2_hf_dir, tmp_path):
    from fixtures_lm_servers import _require_vllm

    _require_vllm()
    from iclcls.lm.server import start_vllm_server

    handle = start_vllm_server(smollm2_hf_dir, max_model_len=1024, wait=True, timeout=900)
    print(f"\n[faults] own vLLM server ready in {handle.start_seconds:.1f} s at {handle.base_url}")
    url = handle.base_url
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""
        data:
          benchmark: sample
          validation_size: null
        classifier:
          lm: "openai:{handle.model}@{url}"
          rank: generative
          shortlist: knn_vote
          shortlist_k: 4
          shots: 2
          batch_size: 2
          tune: false
        eval:
          checkpoint_every: 2
    """))
    run = tmp_path / "run"
    partial = run / "predictions.partial.jsonl"
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    stub = None
    try:
        proc = subprocess.Popen(_eval_cmd(cfg, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 600
        while _lines(partial) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.killpg(handle.process.pid, signal.SIGKILL)  # the server dies mid-run, no goodbye
        handle.stop(grace=0)
        output, _ = proc.communicate(timeout=300)
        output = " ".join(output.decode().split())
        assert proc.returncode == 75, output  # EX_TEMPFAIL
        assert "the LM server failed" in output and url in output, output
        assert "run the same command again to resume" in output
        done = _lines(partial)
        assert 4 <= done < 24, done
        finished = {json.loads(x)["index"] for x in partial.read_text().splitlines()}

        # Re-run against a server on the same URL: only the unfinished examples reach it.
        # (A stand-in server, so the request count is exact and no second vLLM start is paid.)
        log = tmp_path / "requests.jsonl"
        stub = start_stub(handle.port, log=log, model=handle.model)
        res = subprocess.run(_eval_cmd(cfg, run), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _lines(log) == 24 - done  # one completion per unfinished example, none for the finished
        rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in rows) == list(range(24))  # rows lost: 0
        assert finished <= {r["index"] for r in rows}
        assert f"{done} from earlier" in " ".join(res.stdout.split())
        print(f"[faults] killed the server after {done} of 24 examples; the re-run computed {24 - done}, lost 0")
    finally:
        handle.stop(grace=0)
        if stub is not None:
            stop(stub)
