"""A small OpenAI-shaped HTTP server, run as its own process by the fault-injection tests.

It answers ``/v1/models`` (with ``max_model_len``), ``/tokenize`` (about chars/4) and
``/v1/completions`` (a fixed answer), after ``--delay`` seconds per request, and appends one
line per completion request to ``--log`` so a test can count what reached it. It stands in
for a server only where the test is about the client and the run (timeouts, resume), never
for a model's answers.

    python tests/stub_openai_server.py --port 8123 [--delay 5] [--answer " card_lost"] [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    """Quiet request handler that answers JSON (shared by the stub process and in-test servers)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--answer", default=" card_lost")
    ap.add_argument("--model", default="stub")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(JsonHandler):

        def do_GET(self):
            time.sleep(args.delay)
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": args.model, "object": "model", "owned_by": "stub", "max_model_len": 2048}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            time.sleep(args.delay)
            if self.path == "/tokenize":
                self._send(200, {"count": max(1, len(body.get("prompt", "")) // 4)})
            elif self.path == "/v1/completions":
                if args.log:
                    with lock, open(args.log, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"prompt": body.get("prompt", "")[-80:]}) + "\n")
                self._send(200, {"id": "c", "object": "text_completion", "created": 0, "model": args.model,
                                 "choices": [{"index": 0, "text": args.answer, "logprobs": None,
                                              "finish_reason": "stop"}]})
            else:
                self._send(404, {"error": "not found"})

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    print(f"ready on {args.port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
