"""Save and load a fitted classifier: JSON + numpy + faiss files, no pickle, written to a
temporary folder and swapped into place atomically (``iclcls.io.replace_dir``); LM weights
are never saved. Loading treats the folder as untrusted input (``classifier.trust``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iclcls.classifier.base import ClassifierBase
from iclcls.classifier.specs import spec_of
from iclcls.classifier.trust import FORMAT, FORMAT_VERSION, untrusted_parts, validate_state
from iclcls.errors import ConfigError, UntrustedStateError
from iclcls.io import atomic_write_json, load_npy, read_json, replace_dir, save_npy
from iclcls.pool import Pool


class Persistence(ClassifierBase):
    """``save`` and ``load`` (a mixin of ICLClassifier)."""

    def save(self, directory: str | Path) -> None:
        """Write the state to ``directory`` atomically (a temp folder renamed into place)."""
        self._check_fitted("save")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            params = self.get_params(deep=False)
            params["lm"] = self.lm if isinstance(self.lm, str) or self.lm is None else None
            params["embedder"] = self.embedder if isinstance(self.embedder, str) or self.embedder is None else self.embedder_.name
            params["shortlist"] = spec_of(self.shortlist, self.shortlister_)
            params["select"] = spec_of(self.select, self.selector_)
            params["rank"] = spec_of(self.rank_spec(), self.ranker_)
            params["infer"] = self.infer if isinstance(self.infer, (str, Mapping)) or self.infer is None else None
            stages = {}
            for key, stage in (("shortlist", self.shortlister_), ("select", self.selector_)):
                if stage is not None:
                    meta, arrays = stage.state_dict()
                    for name, arr in arrays.items():
                        save_npy(tmp / "stages" / f"{key}.{name}.npy", arr)
                    stages[key] = {"meta": meta, "arrays": sorted(arrays)}
            self.pool_.save(tmp / "pool")
            atomic_write_json(
                tmp / "config.json",
                {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "params": params,
                    "lm_name": self.lm_.name if self.lm_ is not None else None,
                    "embedder_name": self.embedder_.name,
                    "tuned": self.tuned_,
                    "ranker_state": self.ranker_.tuned_state(),
                    "stages": stages,
                    "summaries": self.summaries_,
                },
            )
            replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | Path, *, lm: Any = None, embedder: Any = None, trust: bool = False) -> Any:
        """Rebuild a saved classifier. ``lm`` overrides the saved LM spec (needed if it was an object).

        A state folder is untrusted input: ``config.json`` is validated against a strict schema
        (``ConfigError`` naming the field), and a state that names an LM endpoint or local
        model, a file path or a template file raises ``UntrustedStateError`` unless
        ``trust=True`` or the caller overrides it (``lm=``, ``embedder=``). The faiss index is
        read only from the state's own file, after its recorded size and SHA-256 match.
        """
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: not a saved ICLClassifier (no config.json)")
        cfg = validate_state(d / "config.json", read_json(d / "config.json"), cls)
        params = dict(cfg["params"])
        if not trust:
            problems = untrusted_parts(d, params, lm_given=lm is not None, embedder_given=embedder is not None)
            if problems:
                raise UntrustedStateError(
                    f"{d}: refusing to load an untrusted state: " + "; ".join(problems) + ". A saved state is "
                    "data: it may not choose an LM endpoint or local model, read files, or bring templates. "
                    "If you trust whoever made this folder, load it with trust=True (CLI: --trust-state); "
                    "or override the LM with lm=... (CLI: --lm)"
                )
        if lm is not None:
            params["lm"] = lm
        if embedder is not None:
            params["embedder"] = embedder
        clf = cls(**params)
        from iclcls.embed import get_embedder

        clf.embedder_ = get_embedder(clf.embedder) if clf.embedder is None or isinstance(clf.embedder, str) else clf.embedder
        if clf.embedder_.name != cfg.get("embedder_name"):
            raise ConfigError(
                f"{d}: saved with embedder {cfg.get('embedder_name')!r} but loading with {clf.embedder_.name!r}; "
                "pass embedder= the same model"
            )
        clf.pool_ = Pool.load(d / "pool", clf.embedder_, require_checksum=not trust, trust=trust)
        states = {}
        for key, info in cfg.get("stages", {}).items():
            if info:
                states[key] = (info["meta"], {n: load_npy(d / "stages" / f"{key}.{n}.npy") for n in info["arrays"]})
        clf.summaries_ = dict(cfg.get("summaries", {}))
        clf._build_stages(selector_state=states.get("select"), shortlist_state=states.get("shortlist"))
        ranker_state = cfg.get("ranker_state", {})
        if ranker_state:
            unknown = sorted(set(ranker_state) - set(clf.ranker_.tuned_state()))
            if unknown:
                raise ConfigError(
                    f"{d / 'config.json'}: field ranker_state: keys {unknown} are not state of the {type(clf.ranker_).__name__} ranker"
                )
        clf.ranker_.load_tuned_state(ranker_state)
        clf.tuned_ = cfg.get("tuned", {})
        return clf
