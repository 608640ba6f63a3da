"""Reading a GGUF file's metadata header, fast: one key without parsing tensors or vocabulary.

``gguf.GGUFReader`` parses every tensor and vocabulary entry up front (over 10 s for a
262k-token vocabulary on a small CPU); one flag needs only a sequential scan of the
key-value section (format: github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata_value(path: str | os.PathLike, key: str) -> Any:
    """One scalar or string metadata value of a GGUF file, or None; reads only the header."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        (n_kv,) = struct.unpack_from("<Q", buf, 16)
        pos = 24

        def read_str(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8 : pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def skip(vtype: int, pos: int) -> int:
            if vtype in _SCALAR:
                return pos + struct.calcsize("<" + _SCALAR[vtype])
            if vtype == 8:
                return read_str(pos)[1]
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _SCALAR:
                    return pos + count * struct.calcsize("<" + _SCALAR[etype])
                for _ in range(count):
                    pos = skip(etype, pos)
                return pos
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        for _ in range(n_kv):
            name, pos = read_str(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if name == key:
                if vtype in _SCALAR:
                    return struct.unpack_from("<" + _SCALAR[vtype], buf, pos)[0]
                if vtype == 8:
                    return read_str(pos)[0]
                return None
            pos = skip(vtype, pos)
    return None


def gguf_add_bos(path: str | os.PathLike | None) -> bool | None:
    """The GGUF's own word on a leading BOS token (transformers' GGUF tokenizer drops it); None if unsaid."""
    if path is None or not os.path.isfile(path):
        return None
    value = gguf_metadata_value(path, "tokenizer.ggml.add_bos_token")
    return None if value is None else bool(value)
