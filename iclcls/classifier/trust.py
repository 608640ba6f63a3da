"""A saved state is untrusted input: the schema of its ``config.json`` and what in it only a
trusted state may ask for (an LM endpoint or local model, a file path, a template file).

``load`` calls ``validate_state`` (strict: unknown fields refused, errors name the field) and,
unless the caller trusts the state, ``untrusted_parts``. Nothing here reads a file the state
names; a state is data, never code.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iclcls.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

FORMAT = "iclcls-classifier"
FORMAT_VERSION = 1

_STAGE_KEYS = ("shortlist", "select")
_ARRAY_NAME = r"^[A-Za-z0-9_]+$"
# Free-text options: words, not file names (everything else is checked for paths).
_TEXT_OPTIONS = frozenset({"instructions", "input_prefix", "label_prefix", "primer", "name", "order"})
_FILE_SUFFIXES = frozenset(
    ".json .jsonl .csv .tsv .parquet .txt .jinja .j2 .yaml .yml .npy .npz .faiss .gguf .bin .pt .pth "
    ".safetensors .pkl .pickle .py .sh .db .sqlite".split()
)


@cache
def _state_models(cls: type[Any]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The pydantic models of ``config.json``: strict, unknown fields refused; every constructor
    option has a JSON type here (a test keeps the two in step)."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

    Spec = str | dict[str, Any] | None
    typed: dict[str, Any] = {
        "lm": str | None, "embedder": str | None, "shortlist": Spec, "select": Spec, "rank": Spec,
        "infer": Spec, "prompt": dict[str, Any] | None, "shortlist_k": int, "shots": int,
        "multi_label": bool, "top_k": int | None, "threshold": float | None, "batch_size": int,
        "label_token_reserve": int, "show_progress": bool | None,
    }  # fmt: skip
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        fields[name] = (typed.get(name, Any), default)
    strict = ConfigDict(extra="forbid", strict=True)
    Params = create_model("StateParams", __config__=strict, **fields)

    class StageState(BaseModel):
        model_config = strict
        meta: dict[str, Any]
        arrays: list[Annotated[str, StringConstraints(pattern=_ARRAY_NAME)]]

    class StateConfig(BaseModel):
        model_config = strict
        format: Literal["iclcls-classifier"]
        version: int = Field(ge=1, le=FORMAT_VERSION)
        params: Params  # type: ignore[valid-type]
        lm_name: str | None = None
        embedder_name: str
        tuned: dict[str, Any] = {}
        ranker_state: dict[str, Any] = {}
        stages: dict[Literal["shortlist", "select"], StageState | None] = {}
        summaries: dict[str, str] = {}

    return Params, StateConfig


def validate_state(path: Path, raw: Any, cls: type) -> dict[str, Any]:
    """``config.json`` checked against the schema; a ``ConfigError`` names the first bad fields."""
    from pydantic import ValidationError

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if isinstance(raw.get("version"), int):
        if raw["version"] > FORMAT_VERSION:
            raise ConfigError(f"{path.parent}: saved by a newer iclcls (format version {raw['version']})")
    _, StateConfig = _state_models(cls)
    try:
        model = StateConfig.model_validate(raw)
    except ValidationError as e:
        errs = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            got = repr(err.get("input"))[:80]
            errs.append(f"field {where}: {err['msg']} (got {got})")
        more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise ConfigError(f"{path}: not a valid iclcls state: " + "; ".join(errs) + more) from None
    out = model.model_dump()
    out["params"] = {k: v for k, v in out["params"].items() if k in raw["params"]}  # keep defaults implicit
    return out


def untrusted_parts(d: Path, params: Mapping[str, Any], *, lm_given: bool, embedder_given: bool) -> list[str]:
    """What in a state only a trusted state may ask for, each with why."""
    problems = []
    if not lm_given and params.get("lm") is not None:
        why = _lm_spec_problem(params["lm"])
        if why:
            problems.append(f"lm {params['lm']!r} {why}")
    emb = params.get("embedder")
    if not embedder_given and isinstance(emb, str):
        why = _embedder_spec_problem(emb)
        if why:
            problems.append(f"embedder {emb!r} {why}")
    for key in ("shortlist", "select", "rank", "infer", "prompt"):
        spec = params.get(key)
        if isinstance(spec, Mapping):
            problems += _option_problems(spec, f"{key}")
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            problems.append(f"{p.relative_to(d)} is a symbolic link (a state is read only from its own files)")
    return problems


def _lm_spec_problem(spec: str) -> str | None:
    """Why an LM spec from a state is not safe to follow, or None for a registry model name."""
    from iclcls.lm.models import OFFLINE_MODELS

    base = spec.removesuffix("+cache")
    kind, sep, rest = base.partition(":")
    if kind == "openai" and sep:
        return "is an LM endpoint (every input would be sent to that server)"
    name = rest if sep and kind in ("vllm", "hf") else base
    if name in OFFLINE_MODELS:
        return None
    if _looks_like_path(name):
        return "is a filesystem path (a state may name registry models, not load local files)"
    return f"is not a registry model name ({', '.join(sorted(OFFLINE_MODELS))})"


def _embedder_spec_problem(spec: str) -> str | None:
    """Why an embedder spec from a state is not safe to follow, or None for a known offline
    name: an allow-list, like the LM's (``st:../models``, ``clip:./x`` and Hub names need trust)."""
    from iclcls.embed import is_known_embedder

    if is_known_embedder(spec):
        return None
    model = spec.partition(":")[2] if spec.startswith(("st:", "clip:")) else spec
    if _looks_like_path(model) or Path(model).exists():
        return "is a local path (a state may name known models, not load files)"
    return (
        "is not a known offline embedder (default, all-MiniLM-L6-v2, mpnet, pixels[:WxH[:L|RGB]]); "
        "a state may not choose a model to download"
    )


def _looks_like_path(text: str) -> bool:
    if not text:
        return False
    if text.startswith(("/", "~", ".", "\\")) or "\\" in text or Path(text).suffix.lower() in _FILE_SUFFIXES:
        return True
    if "/" in text:  # "org/model" Hub names are fine unless such a path exists here
        return Path(text).exists() or text.count("/") > 1
    return False  # a bare word is an option value (a file would need a suffix or a folder)


def _option_problems(options: Any, where: str) -> list[str]:
    """Template files and file paths among a stage's options (recursively)."""
    from iclcls.prompt import is_packaged_template

    out = []
    if isinstance(options, Mapping):
        for key, value in options.items():
            here = f"{where}.{key}"
            if key == "template" or key.endswith("_template"):
                if value is not None and not is_packaged_template(value):
                    out.append(f"{here} {value!r} is not a packaged template (a state may not bring template files)")
            elif key == "validation" and isinstance(value, str):
                if value != "holdout" and not re.fullmatch(r"benchmark:[\w.-]+", value):
                    out.append(f"{here} {value!r} is a file path (a state may not read files)")
            elif isinstance(value, str):
                if key not in _TEXT_OPTIONS and _looks_like_path(value):
                    out.append(f"{here} {value!r} is a file path (a state may not read files)")
            else:
                out += _option_problems(value, here)
    elif isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            if isinstance(value, str):
                if _looks_like_path(value):
                    out.append(f"{where}[{i}] {value!r} is a file path (a state may not read files)")
            else:
                out += _option_problems(value, f"{where}[{i}]")
    return out
