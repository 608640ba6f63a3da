"""OpenAICompatibleLM against a real vLLM server (slow) and against a tiny stdlib server
that only exists to exercise error handling: missing capabilities, retries, timeouts.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
from stub_openai_server import JsonHandler

from iclcls.lm.base import LM, CapabilityError
from iclcls.lm.openai_compat import OpenAICompatibleLM, ServerError, _api_base, image_to_url
from iclcls.lm.server import ServerHandle, free_port

TOL = 2e-3  # nats per token, as in test_lm_vllm.py (measured differences are ~1e-5)

REQUESTS = [
    ("Review: a dull, lifeless film.\nSentiment:", [" negative", " positive", " very negative"]),
    ("Answer: ", ["yes", "no"]),
    ("Q: What is the capital of France?\nA:", [" Paris", " The capital of France is Paris."]),
]


# -- a tiny local server ----------------------------------------------------------------------


class TinyServer:
    """An OpenAI-shaped server that answers completions WITHOUT logprobs; configurable failures."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.fail_first = 0  # answer 503 to the first N POSTs
        self.delay = 0.0  # seconds to sleep before answering POSTs
        tiny = self

        class Handler(JsonHandler):
            def do_GET(self):
                tiny.requests.append(("GET", self.path, {}))
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "tiny", "owned_by": "tiny-org"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                tiny.requests.append(("POST", self.path, body))
                posts = sum(1 for r in tiny.requests if r[0] == "POST")
                if tiny.delay:
                    time.sleep(tiny.delay)
                if posts <= tiny.fail_first:
                    self._send(503, {"error": "overloaded"})
                elif self.path == "/v1/completions":
                    n = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
                    self._send(200, {"choices": [{"index": i, "text": " ok", "logprobs": None} for i in range(n)]})
                elif self.path == "/v1/chat/completions":
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
                else:
                    self._send(404, {"error": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def posts(self, path: str) -> list[dict]:
        return [b for m, p, b in self.requests if m == "POST" and p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny():
    server = TinyServer()
    yield server
    server.close()


def client(tiny: TinyServer, **kw) -> OpenAICompatibleLM:
    return OpenAICompatibleLM(tiny.url, "tiny", **kw)


# -- error handling (fast, tiny server) -----------------------------------------------------------


def test_api_base_accepts_a_host_or_an_api_root():
    assert _api_base("http://h:8000") == "http://h:8000/v1"
    assert _api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert _api_base("https://x.com/v1beta/openai") == "https://x.com/v1beta/openai"


def test_scoring_without_prompt_logprobs_is_a_clear_capability_error(tiny):
    lm = client(tiny)
    with pytest.raises(CapabilityError, match="prompt log-probs.*generative"):
        lm.score_batch([("Sentiment:", [" good", " bad"])])
    sent = tiny.posts("/v1/completions")[0]
    assert sent["echo"] is True and sent["logprobs"] == 1 and sent["max_tokens"] == 0
    assert sent["prompt"] == ["Sentiment: good", "Sentiment: bad"]
    # Constrained choice on a server that is not vLLM falls back to scoring, so fails the same way.
    assert not lm.is_vllm
    with pytest.raises(CapabilityError, match="constrained choice"):
        lm.generate(["Sentiment:"], choices=["good", "bad"])


def test_retries_a_503_then_succeeds(tiny):
    tiny.fail_first = 2
    lm = client(tiny, max_retries=3)
    assert lm.generate(["Hello"], max_tokens=3) == [" ok"]
    assert len(tiny.posts("/v1/completions")) == 3


def test_gives_up_after_max_retries(tiny):
    tiny.fail_first = 100
    lm = client(tiny, max_retries=2)
    with pytest.raises(ServerError, match=rf"{tiny.url}/v1/completions -> HTTP 503 after 3 attempts"):
        lm.generate(["Hello"])
    assert len(tiny.posts("/v1/completions")) == 3


def test_times_out_with_a_clear_error(tiny):
    tiny.delay = 1.0
    lm = client(tiny, timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(ServerError, match=rf"{tiny.url}/v1/completions: timed out after 0.2 s"):
        lm.generate(["Hello"])
    assert time.perf_counter() - start < 1.0  # did not wait for the slow answer


def test_unreachable_server_is_a_connection_error(tiny):
    url = tiny.url
    tiny.close()
    lm = OpenAICompatibleLM(url, "tiny", max_retries=1, timeout=2)
    with pytest.raises(ServerError, match=rf"{url}/v1/completions: connection failed"):
        lm.generate(["Hello"])
    with pytest.raises(ServerError, match=rf"{url}/v1/models: connection failed"):
        lm.context_window  # no silent 4,096
    with pytest.raises(ServerError, match="connection failed"):
        lm.is_vllm  # a failure is not "not vLLM"...
    assert lm._structured is None  # ...and nothing was cached


def test_sizes_never_fall_back_silently(tiny):
    lm = client(tiny)
    with pytest.raises(ServerError, match=r"/v1/models does not report a context window .* pass context_window="):
        lm.context_window  # /v1/models has no max_model_len
    assert client(tiny, context_window=1234).context_window == 1234
    with pytest.raises(ServerError, match=r"/tokenize does not exist.*tokenizer=.*approximate_tokens=True"):
        lm.count_tokens("abcdefgh")
    assert lm.token_count_exact


def test_approximate_tokens_is_opt_in_and_recorded_in_the_trace(tiny):
    from iclcls.prompt import PromptBuilder

    lm = client(tiny, approximate_tokens=True, context_window=4096)
    assert lm.count_tokens("abcdefgh") == 2  # chars / 4
    assert not lm.token_count_exact
    built = PromptBuilder().build("a query", [], [], ["x", "y"], count_tokens=lm.count_tokens, budget=100)
    assert built.trace["token_count"] == "approximate"
    assert len([r for r in tiny.requests if r[1] == "/tokenize"]) == 1  # a 404 is remembered: it is an answer


def test_extra_body_reaches_the_server(tiny):
    lm = client(tiny, extra_body={"top_k": 5, "repetition_penalty": 1.1})
    lm.generate(["Hello"], max_tokens=2)
    sent = tiny.posts("/v1/completions")[0]
    assert sent["top_k"] == 5 and sent["repetition_penalty"] == 1.1 and sent["max_tokens"] == 2


def test_chat_sends_images_as_data_urls_and_runs_concurrently(tiny, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (0, 0, 255)).save(buf, format="JPEG")
    lm = client(tiny, concurrency=4)
    tiny.delay = 0.3
    convs = [
        [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image", "image": str(path)}]}],
        [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()}]}],
        [{"role": "user", "content": [{"type": "image", "image": "https://example.org/cat.png"}]}],
        [{"role": "user", "content": "plain text"}],
    ]
    start = time.perf_counter()
    assert lm.chat(convs) == ["hi"] * 4
    assert time.perf_counter() - start < 4 * 0.3  # in parallel, not one after another
    urls = [
        part["image_url"]["url"]
        for body in tiny.posts("/v1/chat/completions")
        for part in body["messages"][0]["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]
    png = next(u for u in urls if u.startswith("data:image/png;base64,"))
    assert base64.b64decode(png.split(",", 1)[1]) == path.read_bytes()
    assert any(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert "https://example.org/cat.png" in urls
    with pytest.raises(FileNotFoundError, match="nope.png"):
        image_to_url(tmp_path / "nope.png")


# -- the server helper's process handling (fast, plain Python processes) ----------------------------

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _launch(tmp_path, code: str) -> ServerHandle:
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ServerHandle(proc, "127.0.0.1", free_port(), "m", log, grace=0.5, _started=time.perf_counter())


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_wait_ready_reports_an_early_exit_with_the_log_tail(tmp_path):
    handle = _launch(tmp_path, "import sys; print('bad model dir'); sys.exit(3)")
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*bad model dir"):
        handle.wait_ready(timeout=30)


def test_stop_kills_the_whole_group_even_when_it_ignores_sigterm(tmp_path):
    handle = _launch(tmp_path, STUBBORN)
    deadline = time.time() + 30
    while not handle.log_path.read_text().strip() and time.time() < deadline:
        time.sleep(0.05)
    child = int(handle.log_path.read_text().split()[0])
    assert _running(handle.process.pid) and _running(child)
    with pytest.raises(RuntimeError, match="not ready after 0 s"):
        handle.wait_ready(timeout=0.2)  # nothing answers HTTP: gives up and stops the group
    assert not _running(handle.process.pid) and not _running(child)


# -- a real vLLM server (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_server_facts(openai_lm, vllm_server):
    assert isinstance(openai_lm, LM)
    assert openai_lm.is_vllm
    assert openai_lm.context_window == 2048
    assert openai_lm.count_tokens("Hello world") == 2 and openai_lm.token_count_exact
    assert vllm_server.alive()


@pytest.mark.slow
def test_completions_and_chat(openai_lm):
    out = openai_lm.generate(["The capital of France is", "1, 2, 3, 4,"], max_tokens=8)
    assert "Paris" in out[0] and "5" in out[1]
    assert "," not in openai_lm.generate(["1, 2, 3, 4,"], max_tokens=16, stop=[","])[0]
    reply = openai_lm.chat([[{"role": "user", "content": "What is 2+2? Answer with a number."}]], max_tokens=12)
    assert "4" in reply[0]


@pytest.mark.slow
def test_images_on_a_text_model_are_a_capability_error(openai_lm):
    conv = [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image", "image": b"\x89PNG\r\n\x1a\n" + b"\0" * 8}]}]
    with pytest.raises(CapabilityError, match="images"):
        openai_lm.chat([conv])


@pytest.mark.slow
def test_choices_are_enforced_by_the_server(openai_lm):
    choices = ["positive", "negative", "very negative"]
    out = openai_lm.generate(
        ["Review: I loved every minute of it.\nSentiment:", "Tell me a long story about dragons."],
        choices=choices,
        max_tokens=2,
    )
    assert all(o in choices for o in out), out
    assert out[0] == "positive"


@pytest.mark.slow
def test_scores_agree_with_the_engine(openai_lm, vllm_lm):
    """Same weights, same tokens, same split rule: the server's echoed prompt logprobs match the
    in-process engine's (which test_lm_vllm checks against transformers)."""
    ours = openai_lm.score_batch(REQUESTS)
    engine = vllm_lm.score_batch(REQUESTS)
    worst = 0.0
    for a_req, e_req in zip(ours, engine):
        for a, e in zip(a_req, e_req):
            assert a.shape == e.shape and len(a) >= 1  # the same split into the same tokens
            worst = max(worst, float(np.max(np.abs(a - e))))
    print(f"\nserver vs engine: max |delta logprob| per token = {worst:.2e} nats")
    assert worst < TOL
    assert len(ours[1][0]) == 1  # "Answer: " + "yes": the straddling " yes" is the one token
