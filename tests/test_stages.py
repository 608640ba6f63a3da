"""Stages on the real embedder and real data: shortlisters, selectors, prompt fitting, rankers."""

from __future__ import annotations

import numpy as np
import pytest
from scripted_lm import ScriptedLM

from iclcls import Example, ICLClassifier
from iclcls.experiment import subset
from iclcls.pool import Pool
from iclcls.prompt import PromptBuilder
from iclcls.rank import get_ranker
from iclcls.rank.base import RankContext
from iclcls.select import get_selector
from iclcls.shortlist import get_shortlister
from iclcls.types import Candidates, Query


@pytest.fixture(scope="module")
def banking(data_dir):
    from iclcls.data import load_benchmark

    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b.train, subset(b.test, 200, 0)


@pytest.fixture(scope="module")
def pool(banking, embedder):
    p = Pool(embedder)
    p.extend(banking[0])
    return p


def queries(pool, texts):
    return [Query(Example(t), e) for t, e in zip(texts, pool.embedder.encode(texts))]


def test_registries_name_every_stage_and_reject_unknown_names():
    assert {"knn", "random", "class_balanced", "fixed"} <= set(__import__("iclcls.select", fromlist=["x"]).SELECTORS.names())
    with pytest.raises(KeyError, match="unknown selector 'nope'.*knn"):
        get_selector("nope")
    with pytest.raises(TypeError, match="bad options"):
        get_shortlister("knn_vote", bogus=1)
    assert get_ranker("likelihood", reduce="mean").reduce == "mean"


@pytest.mark.parametrize("name", ["knn_vote", "class_mean"])
def test_shortlist_at_10_recall_on_banking77_10shot(name, pool, banking):
    test = banking[1]
    sl = get_shortlister(name).fit(pool)
    cands = sl.shortlist(queries(pool, [e.text for e in test]), 10)
    recall = np.mean([e.label in c.labels for e, c in zip(test, cands)])
    assert recall >= 0.95, recall
    assert all(len(c.labels) == 10 and np.all(np.diff(c.scores) <= 1e-12) for c in cands)


def test_knn_selector_orders_least_to_most_similar_within_candidates(pool):
    q = queries(pool, ["I still have not received my new card, when will it arrive?"])
    cand = Candidates(["card_arrival", "card_delivery_estimate"], np.array([1.0, 0.5]))
    ids = get_selector("knn").fit(pool).select(q, [cand], 6)[0]
    assert len(ids) == 6
    assert {pool.examples[i].label for i in ids} <= {"card_arrival", "card_delivery_estimate"}
    sims = pool.embeddings[ids] @ q[0].embedding
    assert np.all(np.diff(sims) >= -1e-6), "most similar must come last (next to the query)"
    desc = get_selector("knn", order="descending").fit(pool).select(q, [cand], 6)[0]
    assert desc == ids[::-1]


def test_random_selector_is_reproducible_per_query_and_seed(pool):
    q = queries(pool, ["top up failed", "change my pin"])
    sel = get_selector("random", seed=3).fit(pool)
    a = sel.select(q, [None, None], 5)
    b = sel.select(q[::-1], [None, None], 5)[::-1]
    assert a == b and a[0] != a[1]
    assert get_selector("random", seed=4).fit(pool).select(q, [None, None], 5) != a


def test_class_balanced_gives_per_class_examples_of_candidates(pool):
    q = queries(pool, ["how do I top up by card?"])
    cand = Candidates(["top_up_by_card_charge", "topping_up_by_card", "top_up_failed"], np.array([3.0, 2.0, 1.0]))
    ids = get_selector("class_balanced", per_class=2).fit(pool).select(q, [cand], 10)[0]
    labels = [pool.examples[i].label for i in ids]
    assert len(ids) == 6 and all(labels.count(c) == 2 for c in cand.labels)


def test_fixed_selector_uses_given_pool_positions(pool):
    sel = get_selector("fixed", ids=[3, 1, 2]).fit(pool)
    assert sel.select(queries(pool, ["a", "b"]), [None, None], 2) == [[3, 1], [3, 1]]
    with pytest.raises(KeyError, match="no pool example"):
        get_selector("fixed", ids=[10**6]).fit(pool)


def test_prompt_fits_budget_by_dropping_demonstrations_then_truncating(pool):
    b = PromptBuilder()
    full = b.build("where is my card", list(range(8)), pool.examples, ["card_arrival"], count_tokens=lambda s: len(s.split()), budget=10_000)
    assert len(full.demonstrations) == 8 and "dropped_demonstrations" not in full.trace
    assert full.text.endswith("Input: where is my card\nLabel:")
    assert "Possible labels: card arrival" in full.text
    budget = full.tokens - 30
    fitted = b.build("where is my card", list(range(8)), pool.examples, ["card_arrival"], count_tokens=lambda s: len(s.split()), budget=budget)
    assert fitted.tokens <= budget and fitted.trace["dropped_demonstrations"] >= 1
    assert fitted.demonstrations == list(range(8))[fitted.trace["dropped_demonstrations"]:], "drop from the front"
    long_query = "word " * 5000
    t = b.build(long_query, [0, 1], pool.examples, ["card_arrival"], count_tokens=lambda s: len(s.split()), budget=200)
    assert t.tokens <= 200 and "query_truncated_chars" in t.trace and t.demonstrations == []
    with pytest.raises(ValueError, match="too many candidate labels"):
        b.build("q", [], pool.examples, ["x"] * 500, count_tokens=lambda s: len(s.split()), budget=50)


def _ctx(pool, lm, texts, cands):
    b = PromptBuilder()
    prompts = [b.build(t, [], pool.examples, c.labels, count_tokens=None, budget=None) for t, c in zip(texts, cands)]
    return RankContext(lm, queries(pool, texts), cands, prompts, b, pool)


def test_generative_maps_exact_case_and_nearest_then_falls_back_flagged(pool):
    cands = [Candidates(["card_arrival", "lost_or_stolen_card", "pin_blocked"], np.array([3.0, 2.0, 1.0]))] * 4
    lm = ScriptedLM(answers=[" lost_or_stolen_card", " PIN BLOCKED", " my card was stolen", " qwzx"])
    ranks = get_ranker("generative").rank(_ctx(pool, lm, ["a", "b", "c", "d"], cands))
    assert ranks[0].labels[0] == "lost_or_stolen_card" and ranks[0].trace["mapped"][0][2] == "exact"
    assert ranks[1].labels[0] == "pin_blocked" and ranks[1].trace["mapped"][0][2] == "case"
    assert ranks[2].labels[0] == "lost_or_stolen_card" and ranks[2].trace["mapped"][0][2] == "nearest"
    assert ranks[3].labels == ["card_arrival", "lost_or_stolen_card", "pin_blocked"]
    assert ranks[3].trace.get("unmapped_answer") is True
    for r in ranks:
        assert sorted(r.labels) == sorted(cands[0].labels)


def test_likelihood_scores_each_candidate_and_calibration_uses_content_free_prompt(pool):
    cands = [Candidates(["card_arrival", "pin_blocked"], np.array([1.0, 0.0]))]
    lm = ScriptedLM(scores={"card arrival": -1.0, "pin blocked": -3.0})
    r = get_ranker("likelihood").rank(_ctx(pool, lm, ["where is my card"], cands))[0]
    assert r.labels == ["card_arrival", "pin_blocked"]
    assert np.isclose(np.exp(r.scores).sum(), 1.0)
    assert lm.score_requests[0][1] == [" card arrival", " pin blocked"]
    lm2 = ScriptedLM(scores={"card arrival": -1.0, "pin blocked": -3.0})
    r2 = get_ranker("likelihood", calibration="contextual").rank(_ctx(pool, lm2, ["where is my card"], cands))[0]
    assert len(lm2.score_requests) == 2 and "Input: N/A" in lm2.score_requests[1][0]
    assert np.allclose(r2.scores, np.log(0.5)), "equal evidence in both prompts calibrates to uniform"


def test_fusion_weight_zero_is_the_retriever_and_tuning_prefers_it_when_lm_is_wrong(pool):
    cands = [Candidates(["a_label", "b_label"], np.array([1.0, 0.0]))]
    lm = ScriptedLM(scores={"a label": -9.0, "b label": -1.0})
    fusion = get_ranker("fusion", weight=0.0)
    r = fusion.rank(_ctx(pool, lm, ["x"], cands))[0]
    assert r.labels[0] == "a_label"
    tuned = fusion.tune([r.trace] * 5, [("a_label",)] * 5)
    assert tuned["fusion_weight"] < 0.5 and tuned["validation_accuracy"] == 1.0
    tuned = fusion.tune([r.trace] * 5, [("b_label",)] * 5)
    assert tuned["fusion_weight"] >= 0.5 and tuned["validation_accuracy"] == 1.0


def test_label_retriever_uses_guesses_and_priors(embedder):
    from iclcls.types import LabelSpace

    clf = ICLClassifier(shortlist="label_retriever", rank="retriever", select=None, shortlist_k=3)
    clf.fit([], labels=LabelSpace(["python programming", "cooking pasta", "driving a truck"]))
    assert clf.predict_detailed(["we need a senior python developer"])[0].label == "python programming"
    q = Query(Example("job ad"), embedder.encode(["job ad"])[0], ("truck driver",), embedder.encode(["truck driver"]))
    sl = get_shortlister("label_retriever").fit(clf.pool_)
    assert sl.shortlist([q], 1)[0].labels == ["driving a truck"]
    pri = get_shortlister("label_retriever", priors={"cooking pasta": 1.0}, prior_a=1e6).fit(clf.pool_)
    assert pri.shortlist([q], 1)[0].labels == ["cooking pasta"]


def _knn_vote_by_loop(sh, queries, k):
    """The kNN vote summed neighbour by neighbour (the definition the vectorised path must equal)."""
    q = np.stack([x.embedding for x in queries]).astype(np.float32)
    sims, ids = sh.pool_.search(q, sh.neighbors)
    mean_sims = q @ sh.means_.T
    out = []
    for row in range(len(q)):
        votes: dict[str, float] = {}
        valid = ids[row] >= 0
        best = float(sims[row][valid].max())
        for s, i in zip(sims[row][valid], ids[row][valid]):
            w = float(np.exp((s - best) / sh.temperature))
            for lab in sh.pool_.examples[i].labels:
                votes[lab] = votes.get(lab, 0.0) + w
        labels, scores = list(votes), [votes[lab] for lab in votes]
        for lab, ms in zip(sh.mean_labels_, mean_sims[row]):
            if lab not in votes:
                labels.append(lab)
                scores.append(-1.0 + (float(ms) + 1.0) / 4.0)
        order = np.argsort(-np.array(scores), kind="stable")[:k]
        out.append(([labels[i] for i in order], np.array(scores)[order]))
    return out


@pytest.mark.parametrize("k", [1, 10, 77])
def test_knn_vote_vectorised_equals_the_neighbour_loop(pool, banking, k):
    sh = get_shortlister("knn_vote").fit(pool)
    qs = queries(pool, [e.text for e in banking[1][:120]])
    got = sh.shortlist(qs, k)
    for c, (labels, scores) in zip(got, _knn_vote_by_loop(sh, qs, k)):
        assert c.labels == labels
        np.testing.assert_array_equal(c.scores, scores)


def test_knn_vote_multi_label_examples_vote_for_each_label(embedder):
    pool = Pool(embedder)
    pool.extend([Example("card lost", ("card", "lost")), Example("card stolen", ("card", "stolen")),
                 Example("hello there", ("greeting",))])
    sh = get_shortlister("knn_vote", neighbors=3).fit(pool)
    qs = queries(pool, ["my card was lost", "hi"])
    got = sh.shortlist(qs, 4)
    want = _knn_vote_by_loop(sh, qs, 4)
    assert [c.labels for c in got] == [w[0] for w in want]
    assert got[0].labels[0] == "card"  # two neighbours vote for it
