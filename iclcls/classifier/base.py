"""What the mixins of ICLClassifier (additions, tuning, persistence) use of it, declared once for
the type checker: annotations and stubs only, so nothing here shadows the estimator at run time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from iclcls.embed.base import Embedder
from iclcls.lm.base import LM
from iclcls.pool import Pool
from iclcls.prompt import PromptBuilder
from iclcls.rank.base import Ranker
from iclcls.select.base import Selector
from iclcls.shortlist.base import Shortlister
from iclcls.types import Example, Prediction


class ClassifierBase:
    lm: Any  # options, as given to the constructor
    embedder: Any
    shortlist: Any
    select: Any
    infer: Any
    multi_label: bool
    top_k: int | None
    show_progress: bool | None
    embedder_: Embedder  # fitted
    pool_: Pool
    lm_: LM | None
    builder_: PromptBuilder
    shortlister_: Shortlister
    selector_: Selector | None
    ranker_: Ranker
    summaries_: dict[str, str]
    tuned_: dict[str, Any]

    if TYPE_CHECKING:  # ICLClassifier's, and scikit-learn's BaseEstimator.get_params

        def get_params(self, deep: bool = True) -> dict[str, Any]: ...
        def fit(self, X: Iterable[Any], y: Any = None, *, labels: Any = None, tune: str = "auto") -> Any: ...
        def rank_spec(self) -> Any: ...
        def predict_detailed(self, inputs: Iterable[str | Example], *, show_progress: bool | None = None) -> list[Prediction]: ...
        def _check_fitted(self, what: str) -> None: ...
        def _build_stages(
            self, *, selector_state: tuple[dict, dict] | None = None, shortlist_state: tuple[dict, dict] | None = None
        ) -> None: ...
        def _with_tags(self, examples: Sequence[Example], shortlister: Any = None) -> list[Example]: ...
        def _summarize_missing(self) -> None: ...
