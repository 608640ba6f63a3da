"""Data: user files (CSV/TSV/JSONL/JSON/Parquet), Hugging Face datasets, named benchmarks,
class-incremental splits, and the small hand-written sample.

Local files are read by ``tables.read_table`` (pyarrow for CSV/TSV and Parquet, json for JSON/JSONL);
``datasets`` is imported only by ``load_hf_dataset`` (the Hub).
"""

from iclcls.data import intents, goemotions, esco, sample  # noqa: F401, I001  (registers the benchmarks, in this order)
from iclcls.data.benchmark import Benchmark, benchmark_names, load_benchmark, resolve_data_dir
from iclcls.errors import DataError, DataWarning
from iclcls.data.files import load_examples
from iclcls.data.hub import load_hf_dataset
from iclcls.data.images import load_image_folder
from iclcls.data.incremental import class_incremental_tasks, filter_by_labels

BENCHMARKS: tuple[str, ...] = benchmark_names()


def load_split(spec: str, *, split: str = "validation", label_field: str = "label") -> list:
    """Examples named by a config string: ``benchmark:NAME`` (its ``split``) or a labelled data file."""
    if spec.startswith("benchmark:"):
        name = spec.split(":", 1)[1]
        examples = list(load_benchmark(name).split(split))
        if not examples:
            raise DataError(f"benchmark {name!r} has no {split} split")
        return examples
    return load_examples(spec, label_field=label_field)

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
    "load_image_folder",
    "load_split",
    "resolve_data_dir",
]
