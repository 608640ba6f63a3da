"""CEIL (Ye et al. 2023): the DPP selector with its embedding space trained on LM-scored subsets.

Training (in ``fit``), at a scale that runs on a laptop CPU:

1. ``train_queries`` pool examples act as queries; for each, ``subsets`` random demonstration
   sets of ``subset_size`` are drawn from its ``neighbours`` nearest other pool examples.
2. The LM scores every set: the log-likelihood of the query's gold label after a prompt made
   of the set (least to most relevant) and the query. That is CEIL's signal: which *sets*
   help the LM, not which single examples.
3. A linear adapter ``W`` on top of the frozen sentence embeddings (``e -> normalise(e W)``,
   initialised to the identity) is trained so that the DPP's log-determinant of each set
   (relevance to the query plus diversity, with the same kernel as ``dpp``) ranks the sets
   as the LM does: CEIL's pairwise margin-ranking loss
   ``sum_{i<j} max(0, logdet L_{S_j} - logdet L_{S_i} + margin * (j - i))`` over sets sorted
   by LM score, plus ``reg * ||W - I||^2``.

CEIL fine-tunes the whole encoder (BERT-base on a GPU); on two CPU cores a full
fine-tune of the encoder per fit is too slow, so this trains the adapter: same loss, same
kernel, ~150k parameters, seconds per epoch. LM scoring dominates the cost
(``train_queries * subsets`` prompts). The adapter is saved with the classifier's state
as a ``.npy`` array and restored without retraining; ``update`` (new pool examples) keeps
it and only re-projects the pool.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from iclcls.pool import Pool
from iclcls.select.base import SELECTORS, order_by_similarity
from iclcls.select.dpp import DPPSelector, top_by_relevance
from iclcls.types import Query


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


def set_logdet(query: Any, demos: Any, *, lam: float, jitter: float = 1e-4) -> Any:
    """``log det L_S`` for batches of sets (torch): ``query`` [..., d], ``demos`` [..., k, d], unit rows.

    ``log det(diag(q) S diag(q)) = sum r / lam + log det S`` with ``r = (cos + 1) / 2``; ``jitter``
    keeps near-duplicate sets finite (and their gradients bounded).
    """
    import torch

    rel = ((demos @ query.unsqueeze(-1)).squeeze(-1) + 1.0) / 2.0
    sim = (demos @ demos.transpose(-1, -2) + 1.0) / 2.0
    eye = torch.eye(sim.shape[-1], dtype=sim.dtype, device=sim.device)
    return rel.sum(-1) / lam + torch.logdet(sim + jitter * eye)


def margin_ranking_loss(scores: Any, lm_scores: Any, *, margin: float) -> Any:
    """CEIL's loss for [Q, m] model scores of sets and the LM's scores of the same sets.

    Every pair where the LM prefers set i to set j (by rank distance ``t``) costs
    ``max(0, score_j - score_i + margin * t)``; LM ties make no pair.
    """
    import torch

    order = torch.argsort(lm_scores, dim=1, descending=True)
    s = torch.gather(scores, 1, order)
    lm = torch.gather(lm_scores, 1, order)
    m = s.shape[1]
    idx = torch.arange(m, device=s.device)
    dist = (idx[None, :] - idx[:, None]).to(s.dtype)  # j - i
    better = (lm[:, :, None] - lm[:, None, :]) > 1e-6  # LM prefers i over j
    pair = (dist > 0)[None] & better
    hinge = torch.relu(s[:, None, :] - s[:, :, None] + margin * dist[None])
    n = pair.sum().clamp(min=1)
    return (hinge * pair).sum() / n


@SELECTORS.register("ceil")
class CEILSelector(DPPSelector):
    """The ``dpp`` selector in a trained embedding space; ``train=False`` makes it plain ``dpp``."""

    def __init__(
        self,
        *,
        lam: float = 0.05,
        candidates: int = 100,
        order: str = "ascending",
        restrict_to_candidates: bool = True,
        min_gain: float = 1e-9,
        train: bool = True,
        train_queries: int = 200,
        subsets: int = 8,
        subset_size: int = 4,
        neighbours: int = 30,
        epochs: int = 5,
        lr: float = 1e-3,
        margin: float = 1.0,
        reg: float = 1e-2,
        batch_queries: int = 32,
        seed: int = 0,
        prompt: dict | None = None,
        show_progress: bool | None = None,
    ) -> None:
        super().__init__(lam=lam, candidates=candidates, order=order, restrict_to_candidates=restrict_to_candidates, min_gain=min_gain)
        for name, v in (
            ("train_queries", train_queries),
            ("subsets", subsets),
            ("subset_size", subset_size),
            ("neighbours", neighbours),
            ("epochs", epochs),
            ("batch_queries", batch_queries),
        ):
            if v < 1:
                raise ValueError(f"ceil {name} must be >= 1, got {v}")
        if subsets < 2:
            raise ValueError("ceil needs subsets >= 2: the loss compares sets")
        if neighbours < subset_size:
            raise ValueError(f"ceil neighbours ({neighbours}) must be >= subset_size ({subset_size})")
        self.lm_: Any = None  # the classifier's LM, bound before fit (see bind_lm)
        self.train = train
        self.train_queries = train_queries
        self.subsets = subsets
        self.subset_size = subset_size
        self.neighbours = neighbours
        self.epochs = epochs
        self.lr = lr
        self.margin = margin
        self.reg = reg
        self.batch_queries = batch_queries
        self.seed = seed
        self.prompt = prompt
        self.show_progress = show_progress

    @property
    def needs_lm(self) -> bool:
        """Training scores demonstration sets with the LM; a saved adapter loads without one."""
        return self.train

    def bind_lm(self, lm: Any) -> None:
        """The LM that scores the training sets: the classifier's own (bound by it before fit)."""
        self.lm_ = lm

    # -- the trained space -------------------------------------------------------------
    def pool_vectors(self) -> np.ndarray:
        if self._pool_vecs is None or len(self._pool_vecs) != len(self.pool_):
            self._pool_vecs: np.ndarray | None = _normalise(self.pool_.embeddings @ self.adapter_)
        return self._pool_vecs

    def query_vectors(self, queries: Sequence[Query]) -> np.ndarray:
        return _normalise(super().query_vectors(queries) @ self.adapter_)

    def _set_adapter(self, pool: Pool, adapter: np.ndarray) -> None:
        self.pool_ = pool
        self.adapter_ = np.asarray(adapter, dtype=np.float32)
        self._pool_vecs = None

    # -- fit = build the training data with the LM, then train the adapter ---------------
    def fit(self, pool: Pool) -> CEILSelector:
        dim = pool.dim
        self.train_stats_: dict[str, Any] = {}
        self._set_adapter(pool, np.eye(dim, dtype=np.float32))
        if not self.train or len(pool) <= self.subset_size:
            return self
        t0 = time.time()
        queries, sets, lm_scores = self.score_subsets(pool)
        t1 = time.time()
        adapter, losses = self.train_adapter(pool.embeddings, queries, sets, lm_scores)
        self._set_adapter(pool, adapter)
        self.train_stats_ = {
            "train_queries": int(len(queries)),
            "subsets": int(sets.shape[1]),
            "lm_scoring_s": round(t1 - t0, 2),
            "training_s": round(time.time() - t1, 2),
            "loss_first_epoch": round(losses[0], 5),
            "loss_last_epoch": round(losses[-1], 5),
            "refreshed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stale_examples": 0,
        }
        return self

    # A trained adapter is not retrained by each addition (LM scoring of subsets, then training):
    # ``ICLClassifier.refresh_stale`` retrains it on a schedule; until then it projects new examples.
    incremental = False

    def update(self, pool: Pool, new_ids: np.ndarray) -> None:
        """New pool examples: keep the trained adapter, re-project the pool lazily; a trained
        adapter counts them as stale until the next refresh."""
        self._set_adapter(pool, self.adapter_)
        if self.train_stats_:
            self.train_stats_["stale_examples"] = int(self.train_stats_.get("stale_examples", 0)) + len(new_ids)

    @property
    def stale_(self) -> bool:
        return bool(getattr(self, "train_stats_", {}).get("stale_examples"))

    def score_subsets(self, pool: Pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training data: query positions [Q], sets of pool positions [Q, m, k], LM scores [Q, m]."""
        from iclcls.prompt import PromptBuilder

        rng = np.random.default_rng(self.seed)
        n = len(pool)
        labelled = [i for i in range(n) if pool.examples[i].labels]
        qids = rng.permutation(labelled)[: self.train_queries]
        emb = pool.embeddings
        queries, sets = [], []
        for qi in qids:
            sims = emb @ emb[qi]
            others = np.array([j for j in range(n) if j != qi and pool.examples[j].text != pool.examples[qi].text])
            near, _ = top_by_relevance(sims.astype(np.float64), others, self.neighbours)
            if len(near) < self.subset_size:
                continue
            seen: set[tuple[int, ...]] = set()
            chosen = []
            for _ in range(self.subsets * 20):
                s = tuple(sorted(int(x) for x in rng.choice(near, size=self.subset_size, replace=False)))
                if s not in seen:
                    seen.add(s)
                    chosen.append(s)
                if len(chosen) == self.subsets:
                    break
            if len(chosen) < 2:
                continue
            while len(chosen) < self.subsets:  # tiny neighbourhoods: repeat sets (ties make no pairs)
                chosen.append(chosen[len(chosen) % 2])
            queries.append(int(qi))
            sets.append(chosen)
        if not queries:
            raise ValueError("ceil: the pool is too small to build training sets; lower subset_size or neighbours")
        lm = self.lm_
        if lm is None:
            raise ValueError("ceil training needs an LM: give the classifier lm= (e.g. 'smollm2'), or train=False")
        builder = PromptBuilder(**(self.prompt or {}))
        requests = []
        for qi, chosen in zip(queries, sets):
            ex = pool.examples[qi]
            gold = " " + builder.verbalize(ex.labels[0])
            for s in chosen:
                ids = order_by_similarity(list(s), [float(emb[j] @ emb[qi]) for j in s], "ascending")
                text = builder.render(ex.text, [pool.examples[j] for j in ids], [])
                requests.append((text, [gold]))
        scores = []
        show = self.show_progress if self.show_progress is not None else len(requests) > 64
        step = 32
        with tqdm(total=len(requests), desc="ceil: LM-scoring sets", unit="set", disable=not show) as bar:
            for i in range(0, len(requests), step):
                for per_req in lm.score_batch(requests[i : i + step]):
                    scores.append(float(np.sum(per_req[0])))
                bar.update(min(step, len(requests) - i))
        return (
            np.array(queries, dtype=np.int64),
            np.array(sets, dtype=np.int64),
            np.array(scores, dtype=np.float64).reshape(len(queries), self.subsets),
        )

    def train_adapter(
        self, embeddings: np.ndarray, queries: np.ndarray, sets: np.ndarray, lm_scores: np.ndarray
    ) -> tuple[np.ndarray, list[float]]:
        """Adam on the margin-ranking loss; returns the adapter and the mean loss per epoch."""
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        e = torch.tensor(np.asarray(embeddings), dtype=torch.float32)
        dim = e.shape[1]
        w = torch.nn.Parameter(torch.eye(dim))
        eye = torch.eye(dim)
        opt = torch.optim.Adam([w], lr=self.lr)
        q_idx = torch.tensor(queries)
        s_idx = torch.tensor(sets)
        lm = torch.tensor(lm_scores, dtype=torch.float32)
        losses = []
        for _ in range(self.epochs):
            perm = torch.randperm(len(q_idx), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(perm), self.batch_queries):
                b = perm[start : start + self.batch_queries]
                qv = torch.nn.functional.normalize(e[q_idx[b]] @ w, dim=-1)
                sv = torch.nn.functional.normalize(e[s_idx[b]] @ w, dim=-1)
                scores = set_logdet(qv[:, None, :], sv, lam=self.lam)
                loss = margin_ranking_loss(scores, lm[b], margin=self.margin)
                total += float(loss.detach()) * len(b)
                count += len(b)
                loss = loss + self.reg * ((w - eye) ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(total / max(count, 1))
        return w.detach().numpy().astype(np.float32), losses

    # -- persistence: the adapter as an array, never a pickled model ----------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"trained": bool(self.train_stats_), "train_stats": self.train_stats_}, {"adapter": self.adapter_}

    def load_state_dict(self, pool: Pool, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        adapter = arrays.get("adapter")
        if adapter is None:
            raise ValueError("ceil state has no 'adapter' array: it was saved without training state")
        if adapter.shape != (pool.dim, pool.dim):
            raise ValueError(f"ceil adapter has shape {adapter.shape}, but the pool's embeddings have dim {pool.dim}")
        self.train_stats_ = dict(meta.get("train_stats", {}))
        self._set_adapter(pool, adapter)
