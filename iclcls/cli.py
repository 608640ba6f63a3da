"""The ``iclcls`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="In-context-learning classifiers.")


@app.command()
def data(
    name: str = typer.Argument(..., help="benchmark name, e.g. banking77, clinc150, esco_tech"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data folder (default: $ICLCLS_DATA or ../shared/data)"),
) -> None:
    """Print a benchmark's split sizes and label count as JSON."""
    from iclcls.data import load_benchmark

    bench = load_benchmark(name, data_dir=data_dir)
    typer.echo(
        json.dumps(
            {
                "train": len(bench.train),
                "validation": len(bench.validation),
                "test": len(bench.test),
                "labels": len(bench.labels),
            }
        )
    )


if __name__ == "__main__":
    app()
