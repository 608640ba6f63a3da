"""Nearest-neighbour search over labelled examples' embeddings.

A package rather than one module because three separate concerns live here: the faiss
wrapper with integer ids (:mod:`.vector_index`), exact top-k without faiss for score
matrices and GPUs (:mod:`.exact`), and checksummed persistence that never parses an
unverified faiss binary (:mod:`.persist`).
"""

from iclcls.index.exact import topk
from iclcls.index.persist import FORMAT_VERSION, INDEX_FILE, META_FILE
from iclcls.index.vector_index import Metric, VectorIndex

__all__ = ["FORMAT_VERSION", "INDEX_FILE", "META_FILE", "Metric", "VectorIndex", "topk"]
