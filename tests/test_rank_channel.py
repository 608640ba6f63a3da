"""The noisy-channel ranker: per-class prompts, one prefill per class per batch, real SmolLM2 scores."""

from __future__ import annotations

import numpy as np
import pytest
from scripted_lm import ScriptedLM

from iclcls import ICLClassifier
from iclcls.data import load_benchmark
from iclcls.experiment import subset
from iclcls.programs import knn_channel
from iclcls.rank import get_ranker
from iclcls.rank.base import RankContext
from iclcls.types import Candidates, Example, Query


class OverlapLM(ScriptedLM):
    """Control flow only: a continuation scores higher the more of its words the prompt holds."""

    def score_batch(self, requests):
        out = []
        for prompt, conts in requests:
            self.score_requests.append((prompt, list(conts)))
            words = set(prompt.lower().split())
            out.append([np.array([-1.0 * sum(w not in words for w in c.lower().split())]) for c in conts])
        return out


TRAIN = [
    Example("my card has not arrived yet", "card_arrival"),
    Example("when will the card arrive", "card_arrival"),
    Example("the new card never came", "card_arrival"),
    Example("top up with apple pay failed", "top_up_failed"),
    Example("my top up did not work", "top_up_failed"),
    Example("what is the exchange rate today", "exchange_rate"),
    Example("exchange rate for euros", "exchange_rate"),
]


def _fitted(lm, embedder, **rank_options):
    rank = {"name": "channel", **rank_options}
    return ICLClassifier(lm=lm, embedder=embedder, shortlist="knn_vote", shortlist_k=3, select=None, shots=0,
                         rank=rank).fit(TRAIN, tune="none")


def test_each_class_prompt_is_scored_once_per_batch_with_its_queries(embedder):
    lm = OverlapLM()
    clf = _fitted(lm, embedder)
    queries = ["the card did not arrive", "top up failed again", "exchange rate please"]
    preds = clf.predict_detailed(queries)
    assert [p.label for p in preds] == ["card_arrival", "top_up_failed", "exchange_rate"]
    prompts = [p for p, _ in lm.score_requests]
    assert len(prompts) == len(set(prompts)) == 3, "one request per class for the whole batch"
    card = next(p for p in prompts if p.startswith("Label: card arrival"))
    # card_arrival has 3 examples, the other classes 2: every candidate is shown with 2.
    assert card.count("Input: ") == 2 and card.endswith("Input:")
    conts = dict(lm.score_requests)[card]
    assert sorted(conts) == sorted(" " + q for q in queries), "every query with the class on its shortlist"
    p = preds[0]
    assert p.demonstrations == () and "prompt" not in p.trace, "no selector prompt is built"
    assert set(p.trace["channel_examples"]) == set(p.candidates)
    shown = p.trace["channel_examples"]["card_arrival"]
    assert len(shown) == 2 and {clf.pool_.examples[i].text for i in shown} < {e.text for e in TRAIN[:3]}
    assert p.trace["lm_score"]["card_arrival"] == pytest.approx(max(p.trace["lm_score"].values()))
    unequal = OverlapLM()
    _fitted(unequal, embedder, equal_shots=False).predict_detailed(queries[:1])
    card = next(p for p, _ in unequal.score_requests if p.startswith("Label: card arrival"))
    assert card.count("Input: ") == 3


def test_per_class_keeps_the_most_typical_and_the_window_drops_the_least(embedder):
    lm = OverlapLM()
    clf = _fitted(lm, embedder, per_class=2)
    ranker, pool = clf.ranker_, clf.pool_
    ids = pool.indices_of("card_arrival")
    kept = ranker.class_examples(_ctx(clf, lm, ["x"], [["card_arrival"]]), "card_arrival")
    emb = pool.embeddings[ids]
    typical = np.argsort(-(emb @ emb.mean(axis=0)))[:2]
    assert sorted(kept) == sorted(ids[j] for j in typical) and len(kept) == 2
    # A window too small for the class prompt: examples are dropped until it fits (never the query).
    small = OverlapLM(window=14)
    ranking = ranker.rank(_ctx(clf, small, ["the card did not arrive"], [["card_arrival", "exchange_rate"]]))[0]
    (card,) = [p for p, _ in small.score_requests if p.startswith("Label: card")]
    assert card.count("Input: ") < 2 and small.count_tokens(card) + 5 + 2 <= 14
    assert set(ranking.labels) == {"card_arrival", "exchange_rate"}


def test_channel_refuses_queries_without_text_and_bad_options(embedder):
    with pytest.raises(ValueError, match="per_class"):
        get_ranker("channel", per_class=-1)
    clf = _fitted(OverlapLM(), embedder)
    ctx = _ctx(clf, OverlapLM(), [None], [["card_arrival"]])
    with pytest.raises(ValueError, match="query 0 has none"):
        clf.ranker_.rank(ctx)


_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                     "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def _ctx(clf, lm, texts, labels):
    qs = [Query(Example(t) if t is not None else Example(image=_PNG), np.zeros(3))
          for t in texts]
    cands = [Candidates(list(ls), np.zeros(len(ls))) for ls in labels]
    return RankContext(lm, qs, cands, [], clf.builder_, clf.pool_)


@pytest.fixture(scope="module")
def banking(data_dir):
    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b.train, subset(b.test, 12, 3)


@pytest.mark.slow
def test_real_smollm_channel_scores_are_the_query_likelihood_after_each_class(banking, embedder, smollm, tmp_path):
    train, test = banking
    clf = knn_channel(lm=smollm, embedder=embedder, shortlist_k=4).fit(train, tune="none")
    clf.ranker_.weight = 1.0  # the channel score alone
    smollm.clear_prefix_cache()
    preds = clf.predict_detailed(test)
    # Every class prompt was prefilled once and kept for the next batch.
    labels = {lab for p in preds for lab in p.candidates}
    assert len(smollm._prefixes) == len(labels)
    inner = clf.ranker_.inner_ranker_
    for p, ex in zip(preds[:2], test):
        ctx = _ctx(clf, smollm, [ex.text], [list(p.candidates)])
        for lab in p.candidates:
            prompt = inner.class_prompt(ctx, lab, inner.class_examples(ctx, lab))
            direct = smollm.score(prompt, [" " + ex.text])[0]
            assert p.trace["channel_logprob"][lab] == pytest.approx(direct, abs=2e-3)
    # Channel alone beats chance over 4 candidates by far on real data (gold on the shortlist).
    hits = [p.label == e.label for p, e in zip(preds, test) if e.label in p.candidates]
    assert np.mean(hits) >= 0.5
    # A GPU's way (all classes in one batched call, no per-class prefix) scores the same.
    smollm.prefer_batched_requests = True
    try:
        batched = clf.predict_detailed(test[:4])
    finally:
        smollm.prefer_batched_requests = False
    for b, p in zip(batched, preds[:4]):
        for lab in p.candidates:
            assert b.trace["channel_logprob"][lab] == pytest.approx(p.trace["channel_logprob"][lab], abs=1e-3)
    # Saved and loaded untrusted, the preset predicts the same.
    clf.save(tmp_path / "state")
    again = ICLClassifier.load(tmp_path / "state", lm=smollm)
    assert [p.label for p in again.predict_detailed(test[:4])] == [p.label for p in preds[:4]]
