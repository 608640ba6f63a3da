"""Small helpers that several layers share; they import nothing from iclcls."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_len(*seqs: Sequence) -> int:
    """Length of the longest prefix all ``seqs`` share (token ids or strings)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n
