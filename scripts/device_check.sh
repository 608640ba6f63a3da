#!/usr/bin/env bash
# GPU readiness check, for a machine with an NVIDIA GPU (never needed by CI: .ci/run deselects
# `gpu` tests, and they skip themselves without CUDA).
#
#   bash scripts/device_check.sh            # within ~5 minutes; writes eval/results/*_gpu.json
#
# 1. the `gpu`-marked tests (pytest -m gpu), results in eval/results/device_check_tests.json;
# 2. eval/bench_gpu.py: iclcls against plain prefills of its prompts (SmolLM2, and a random-weight
#    8B-shaped Llama built on the GPU), and retriever-only `label` against the embedder alone,
#    written to eval/results/bench_gpu.json ($BENCH_GPU_ARGS adds or overrides options);
# 3. eval/bench_classify.py for the transformers path on the GPU (bf16 where the card supports
#    it, else fp16; device placement explicit: --device cuda:0), written to
#    eval/results/bench_classify_gpu.json, in the time left.
#
# Python: $PYTHON, else .venv/bin/python, else python3 -- it needs a CUDA build of torch
# (the CPU venv of scripts/install.sh has none). Data: ../shared/data or $ICLCLS_DATA.
# Models: SmolLM2 and MiniLM as iclcls finds them offline ($ICLCLS_CACHE, ~/.cache). The
# script says which of these is missing instead of failing half-way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=eval/results
mkdir -p "$OUT"
BUDGET=${DEVICE_CHECK_SECONDS:-290}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
DTYPE=$("$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("device_check: torch is not importable with this Python; set PYTHON= to one with a CUDA torch")
if not torch.cuda.is_available():
    sys.exit(f"device_check: torch {torch.__version__} sees no CUDA device (a CPU build?); set PYTHON= to one with a CUDA torch")
print("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
print(f"device_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}", file=sys.stderr)
EOF
) || exit 2
"$PY" -c "import iclcls, transformers, faiss, sentence_transformers" || {
  echo "device_check: iclcls's dependencies are missing for $PY (pip install -e '.[dev]' there)"; exit 2; }

rc=0
echo "== gpu tests (pytest -m gpu), $(left) s left"
timeout $(( $(left) / 4 )) "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/device_check_tests.xml" tests/ || rc=1
"$PY" - "$OUT/device_check_tests.xml" "$OUT/device_check_tests.json" <<'EOF' || true
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
keys = ("tests", "failures", "errors", "skipped", "time")
json.dump({k: suite.get(k) for k in keys}, open(sys.argv[2], "w"), indent=1)
EOF

echo "== bench_gpu.py, $(left) s left"
timeout $(( $(left) * 2 / 3 )) "$PY" eval/bench_gpu.py --device cuda:0 ${BENCH_GPU_ARGS:-} \
  --out "$OUT/bench_gpu.json" || rc=1

echo "== bench_classify.py, transformers on cuda:0 ($DTYPE), $(left) s left"
timeout $(( $(left) - 5 )) "$PY" eval/bench_classify.py --systems transformers prefill_limit openicl_ppl \
  --device cuda:0 --dtype "$DTYPE" --n 200 --n-openicl 20 --threads 4 \
  --out "$OUT/bench_classify_gpu.json" || rc=1
echo "device_check: done in $(( $(date +%s) - START )) s, rc=$rc"
exit $rc
