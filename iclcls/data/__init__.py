"""Data: user files (CSV/TSV/JSONL/JSON/Parquet), Hugging Face datasets, named benchmarks,
class-incremental splits, and the small hand-written sample.

Importing this package does not import ``datasets`` (only ``load_examples`` and
``load_hf_dataset`` do), so the named benchmarks and the sample load fast.
"""

from iclcls.data import intents, goemotions, esco, sample  # noqa: F401, I001  (registers the benchmarks, in this order)
from iclcls.data.benchmark import Benchmark, benchmark_names, load_benchmark, resolve_data_dir
from iclcls.data.errors import DataError, DataWarning
from iclcls.data.files import load_examples
from iclcls.data.hub import load_hf_dataset
from iclcls.data.incremental import class_incremental_tasks, filter_by_labels

BENCHMARKS: tuple[str, ...] = benchmark_names()

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DataError",
    "DataWarning",
    "class_incremental_tasks",
    "filter_by_labels",
    "load_benchmark",
    "load_examples",
    "load_hf_dataset",
    "resolve_data_dir",
]
