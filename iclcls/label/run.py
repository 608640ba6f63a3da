"""Label a corpus: check everything cheap first, then stream chunks through the classifier.

Order of work, so that a mistake costs nothing: the input's format and columns, OUT's
writability, duplicate ids, the state (loaded, for the local engine) -- and only then OUT
and its sidecar are opened (resume or refuse) and rows are labelled, a chunk at a time,
each chunk appended and fsynced. A run refused or failed before its first row removes the
OUT and sidecar it created. An LM server outage stops the run with :class:`LMUnavailable`
(exit code :data:`EXIT_LM_UNAVAILABLE` from the CLI) after writing the rows finished before
it; a re-run resumes there and, unless ``skip_errors``, labels the earlier error rows again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from iclcls.label.live import load_labeller, store_seq_for
from iclcls.label.output import JsonlSink, StdoutSink, check_writable, state_fingerprint
from iclcls.label.readers import LabelInputError, check_unique_ids, chunked, detect_format, inspect_input, iter_records
from iclcls.label.rows import LMUnavailable, RowOptions, check_row_options, embedding_bound, label_records, prepare, query_embeddings

EXIT_LM_UNAVAILABLE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run the same command again


@dataclass(frozen=True)
class LabelOptions:
    """How to label. The fields marked ``shapes_rows`` go in the sidecar: resuming needs them equal."""

    text_field: str = "text"
    id_field: str | None = None
    with_text: bool = False
    trace: bool = False
    alpha: float | None = None
    lm: str | None = None
    trust: bool = False
    limit: int | None = None
    overwrite: bool = False
    skip_errors: bool = False  # resume: keep OUT's error rows as done instead of labelling them again
    chunk_rows: int = 256
    engine: Literal["local", "ray"] = "local"
    workers: int = 1
    address: str | None = None
    progress: bool = True
    store: str | None = None  # a store of live additions (SQLite path or postgresql:// URL)

    def sidecar(self, input_path: Path) -> dict[str, Any]:
        return {
            "input": str(Path(input_path).resolve()),
            "text_field": self.text_field,
            "id_field": self.id_field,
            "with_text": self.with_text,
            "trace": self.trace,
            "alpha": self.alpha,
            "lm": self.lm,
        }


@dataclass
class LabelSummary:
    """What a run did: rows labelled now, of which failed; rows found already done in OUT."""

    out: str | None
    rows_done: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    seconds: float = 0.0
    total_rows: int | None = None
    engine: str = "local"
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s}


def label_corpus(
    input_path: str | Path, *, state: str | Path, out: str | Path | None, options: LabelOptions = LabelOptions()
) -> LabelSummary:
    """Label every row of ``input_path`` with the classifier saved in ``state`` into ``out``
    (JSONL; None: standard output, no resume). Raises LabelInputError before any work when the
    input, the output or a resume is wrong; row-level failures become error rows instead; an LM
    server outage raises :class:`LMUnavailable` after writing the rows finished before it."""
    t0 = time.perf_counter()
    opts = options
    if opts.chunk_rows < 1 or opts.workers < 1 or (opts.limit is not None and opts.limit < 0):
        raise LabelInputError("chunk_rows and workers must be >= 1 and limit >= 0")
    if opts.engine not in ("local", "ray"):
        raise LabelInputError(f"unknown engine {opts.engine!r}; use local or ray")
    src = Path(input_path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such input file")
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_writable(out_path)
    fmt = detect_format(src)
    info = inspect_input(src, fmt, text_field=opts.text_field, id_field=opts.id_field)
    if opts.id_field is not None:
        check_unique_ids(src, fmt, text_field=opts.text_field, id_field=opts.id_field)
    fingerprint = state_fingerprint(Path(state))
    row_opts = RowOptions(with_text=opts.with_text, trace=opts.trace, alpha=opts.alpha)
    sidecar = opts.sidecar(src)
    store_seq = None
    if opts.store is not None:
        location, store_seq = store_seq_for(opts.store, out_path, overwrite=opts.overwrite)
        sidecar.update(store=location, store_seq=store_seq)
    clf = _load_local(Path(state), opts, row_opts, store_seq) if opts.engine == "local" and info.rows != 0 else None
    sink: JsonlSink | StdoutSink
    if out_path is not None:
        sink = JsonlSink(out_path)
        sink.open(fingerprint=fingerprint, options=sidecar, overwrite=opts.overwrite, skip_errors=opts.skip_errors)
    else:
        sink = StdoutSink()
    total = info.rows if opts.limit is None or info.rows is None else min(info.rows, opts.limit)
    summary = LabelSummary(out=str(out_path) if out_path else None, total_rows=total, engine=opts.engine)
    ok = False
    try:
        if info.rows == 0:
            summary.notes.append(f"{src} has no rows: nothing to label")
        else:
            with tqdm(total=total, desc="label", unit="row", disable=not opts.progress) as bar:  # rows, rows/s, ETA
                for batch in _batches(src, fmt, state=Path(state), clf=clf, opts=opts, row_opts=row_opts, done=sink.done,
                                      store_seq=store_seq):
                    rows = []
                    for _, row in batch:
                        if row is None or row["id"] in sink.done:
                            summary.rows_skipped += 1
                            continue
                        rows.append(row)
                    sink.write(rows)
                    summary.rows_done += len(rows)
                    summary.rows_failed += sum("error" in r for r in rows)
                    bar.set_postfix(failed=summary.rows_failed, refresh=False)
                    bar.update(len(batch))
        ok = True
    except LMUnavailable as e:
        e.summary = summary  # what was written before the outage, for the message
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        if ok or not isinstance(sink, JsonlSink):
            sink.close()
        else:
            sink.discard()
    return summary


def _load_local(state: Path, opts: LabelOptions, row_opts: RowOptions, store_seq: int | None) -> Any:
    """The classifier for the local engine, loaded (and the row options checked against it)
    before OUT is opened, so that a bad state or option leaves OUT as it was."""
    clf = load_labeller(state, lm=opts.lm, trust=opts.trust, store=opts.store, store_seq=store_seq)
    clf = prepare(clf, chunk_rows=opts.chunk_rows)
    check_row_options(clf, row_opts)
    return clf


def _batches(
    src: Path, fmt: Any, *, state: Path, clf: Any, opts: LabelOptions, row_opts: RowOptions, done: set[Any],
    store_seq: int | None = None,
) -> Iterator[list[tuple[int, dict[str, Any] | None]]]:
    """``(row number, row or None when already done)`` batches, in input order, from either engine.

    On an LM outage the rows finished before it come as a last, shorter batch, then
    :class:`LMUnavailable` is raised."""
    if opts.engine == "ray":
        from iclcls.label.ray_engine import iter_ray_rows

        yield from iter_ray_rows(
            src, fmt, state=state, lm=opts.lm, trust=opts.trust, text_field=opts.text_field,
            id_field=opts.id_field, chunk_rows=opts.chunk_rows, row_options=row_opts, workers=opts.workers,
            address=opts.address, limit=opts.limit, done=done, store=opts.store, store_seq=store_seq,
        )
        return
    records = iter_records(src, fmt, text_field=opts.text_field, id_field=opts.id_field)
    chunks = chunked(_limited(records, opts.limit), opts.chunk_rows)
    for chunk, todo, emb in _prefetched(chunks, clf, done):
        try:
            labelled = label_records(clf, todo, row_opts, embeddings=emb)
        except LMUnavailable as outage:
            yield _finished(chunk, done, outage.rows)
            raise
        it = iter(labelled)
        yield [(r.row, None if r.id in done else next(it)) for r in chunk]


def _prefetched(chunks: Iterator[list[Any]], clf: Any, done: set[Any]) -> Iterator[tuple[list[Any], list[Any], Any]]:
    """``(chunk, its rows to label, their embeddings or None)``. When the embedder sets the pace
    (no LM per query), the next chunk is read and embedded in a worker thread while the caller
    searches, ranks and writes this one: on a GPU the device stays busy between chunks."""
    def read(chunk: list[Any]) -> tuple[list[Any], list[Any], Any]:
        todo = [r for r in chunk if r.id not in done]
        try:
            return chunk, todo, query_embeddings(clf, todo) if todo else None
        except Exception:  # noqa: BLE001 - label_records embeds again and contains the failure to its rows
            return chunk, todo, None

    if not embedding_bound(clf):
        for chunk in chunks:
            yield chunk, [r for r in chunk if r.id not in done], None
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="iclcls-embed") as worker:
        ahead = None
        for chunk in chunks:
            job = worker.submit(read, chunk)
            if ahead is not None:
                yield ahead.result()
            ahead = job
        if ahead is not None:
            yield ahead.result()


def _finished(chunk: list[Any], done: set[Any], rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any] | None]]:
    """The chunk's records up to the first one the outage left unlabelled."""
    it, out = iter(rows), []
    for r in chunk:
        if r.id in done:
            out.append((r.row, None))
            continue
        row = next(it, None)
        if row is None:
            break
        out.append((r.row, row))
    return out


def _limited(records: Iterator[Any], limit: int | None) -> Iterator[Any]:
    for i, r in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield r
