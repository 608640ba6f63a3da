"""Selectors from the literature on the real embedder, data and LM: DPP, CEIL, influence, many-shot,
the shared-prefix path of the likelihood ranker, and query batching."""

from __future__ import annotations

import numpy as np
import pytest

from iclcls import Example, ICLClassifier
from iclcls.data import load_examples
from iclcls.experiment import subset
from iclcls.pool import Pool
from iclcls.select import get_selector
from iclcls.select.dpp import dpp_kernel, greedy_map
from iclcls.select.influence import SoftmaxRegression, influence_scores
from iclcls.types import Candidates, Query


@pytest.fixture(scope="module")
def banking(data_dir):
    from iclcls.data import load_benchmark

    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b


@pytest.fixture(scope="module")
def pool(banking, embedder):
    p = Pool(embedder, banking.labels)
    p.extend(banking.train)
    return p


def queries(pool, texts):
    return [Query(Example(t), e) for t, e in zip(texts, pool.embedder.encode(texts))]


def mean_pairwise_cos(pool, ids):
    e = pool.embeddings[ids]
    s = e @ e.T
    n = len(ids)
    return (s.sum() - np.trace(s)) / (n * (n - 1))


# ---- DPP ------------------------------------------------------------------------------


def test_greedy_map_matches_brute_force_greedy_determinant_maximisation():
    rng = np.random.default_rng(0)
    for trial in range(5):
        e = rng.normal(size=(15, 6))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        kernel = dpp_kernel(rng.uniform(size=15), e, lam=0.1)
        fast = greedy_map(kernel, 5)
        slow: list[int] = []
        for _ in range(5):
            slow.append(max((j for j in range(15) if j not in slow),
                            key=lambda j: np.linalg.det(kernel[np.ix_(slow + [j], slow + [j])])))
        assert fast == slow, trial


def test_greedy_map_stops_at_non_positive_gain_on_duplicates():
    e = np.eye(4)[:3]
    dup = np.vstack([e, e, e])  # every vector three times: rank 3
    kernel = dpp_kernel(np.ones(9), dup, lam=0.1)
    chosen = greedy_map(kernel, 8)
    assert len(chosen) == 3, chosen
    assert len({tuple(dup[i]) for i in chosen}) == 3


def test_dpp_selector_trades_relevance_for_diversity(pool):
    q = queries(pool, ["My card payment was declined at the shop, why?", "how do I change my PIN number"])
    knn = get_selector("knn", restrict_to_candidates=False).fit(pool).select(q, [None, None], 8)
    sharp = get_selector("dpp", lam=0.001, restrict_to_candidates=False).fit(pool).select(q, [None, None], 8)
    diverse = get_selector("dpp", lam=1.0, restrict_to_candidates=False).fit(pool).select(q, [None, None], 8)
    for row in range(2):
        assert set(sharp[row]) == set(knn[row]), "tiny lambda: pure relevance = the kNN set"
        assert len(diverse[row]) == 8 and len(set(diverse[row])) == 8
        assert mean_pairwise_cos(pool, diverse[row]) < mean_pairwise_cos(pool, knn[row]) - 0.02
        rel = pool.embeddings[diverse[row]] @ q[row].embedding
        assert np.all(np.diff(rel) >= -1e-6), "ordered by relevance, most relevant last"


def test_dpp_selector_stays_within_candidate_classes(pool):
    q = queries(pool, ["I still have not received my new card"])
    cand = Candidates(["card_arrival", "card_delivery_estimate", "lost_or_stolen_card"], np.array([3.0, 2.0, 1.0]))
    ids = get_selector("dpp", lam=0.2).fit(pool).select(q, [cand], 10)[0]
    assert len(ids) == 10
    assert {pool.examples[i].label for i in ids} <= set(cand.labels)


def test_dpp_selector_gives_fewer_than_k_on_a_pool_of_duplicates(embedder):
    p = Pool(embedder)
    texts = ["card arrived broken", "transfer is pending", "what is the exchange rate"]
    p.extend([Example(t, (f"c{i}",)) for i, t in enumerate(texts) for _ in range(4)])
    ids = get_selector("dpp", restrict_to_candidates=False).fit(p).select(queries(p, ["my card came damaged"]), [None], 8)[0]
    assert len(ids) == 3 and len({p.examples[i].text for i in ids}) == 3


# ---- influence ----------------------------------------------------------------------------


def _toy_regression(seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 4)) * 2
    y = rng.integers(0, 3, size=60)
    x = centers[y] + rng.normal(size=(60, 4))
    x = np.hstack([x, np.ones((60, 1))])
    yv = rng.integers(0, 3, size=20)
    xv = np.hstack([centers[yv] + rng.normal(size=(20, 4)), np.ones((20, 1))])
    return x, y, xv, yv


def test_influence_uses_the_exact_hessian_and_predicts_the_effect_of_upweighting():
    x, y, xv, yv = _toy_regression()
    model = SoftmaxRegression(x, y, 3, l2=0.05)
    model.fit()
    assert model.grad_norm < 1e-6
    h = model.hessian()
    assert np.allclose(h, h.T, atol=1e-10) and np.linalg.eigvalsh(h).min() > 0
    scores, info = influence_scores(model, xv, yv)
    g_val = model.loss_grad(xv, yv).mean(axis=0).ravel()
    grads = model.loss_grad(x, y).reshape(len(x), -1)
    exact = -grads @ np.linalg.solve(h, g_val)
    assert np.allclose(scores, exact, rtol=1e-5, atol=1e-9), "CG on Hessian-vector products = explicit solve"

    def val_loss(m):
        p = np.exp(xv @ m.w.T)
        p /= p.sum(1, keepdims=True)
        return -np.log(p[np.arange(len(yv)), yv]).mean()

    base = val_loss(model)
    eps = 1e-3
    for z in (int(np.argmin(scores)), int(np.argmax(scores))):
        # Up-weight z by eps (in the mean loss) and refit: the change matches eps * I(z).
        w = np.ones(len(x))
        w[z] += eps * len(x)  # mean loss + eps * l(z)
        m2 = SoftmaxRegression(x, y, 3, l2=0.05, weights=w)
        m2.fit()
        assert (val_loss(m2) - base) / eps == pytest.approx(scores[z], rel=0.1, abs=1e-4)


@pytest.fixture(scope="module")
def influence(pool):
    return get_selector("influence", seed=1).fit(pool)


def test_influence_selector_holds_out_validation_and_caps_per_class(pool, influence):
    sel = influence
    info = sel.fit_info_
    assert info["train"] + info["validation"] == len(pool) and info["validation"] >= 77
    assert info["cg_relative_residual"] < 1e-6
    held = set(range(len(pool))) - set(sel.ranked_)
    assert len(held) == info["validation"]
    q = queries(pool, ["top up failed", "card not working"])
    a, b = sel.select(q, [None, None], 16)
    assert a == b and len(a) == 16 and not set(a) & held
    assert len({pool.examples[i].label for i in a}) == 16, "77 classes, 16 shots: one per class"
    helpful = [-sel.scores_[i] for i in a]
    assert np.all(np.diff(helpful) >= 0), "most helpful last, next to the query"
    assert sel.chosen(16)[:4] == sel.chosen(4)
    sel.per_class = 2
    try:
        two = sel.select(q[:1], [None], 10)[0]
    finally:
        sel.per_class = None
    assert max(np.unique([pool.examples[i].label for i in two], return_counts=True)[1]) == 2
    sel.restrict_to_candidates = True  # the per-query variant: top-R of the candidate classes
    try:
        near = sel.select(q, [Candidates(["top_up_failed", "card_not_working"], np.ones(2))] * 2, 4)
    finally:
        sel.restrict_to_candidates = False
    labels = [pool.examples[i].label for i in near[0]]
    assert sorted(labels) == ["card_not_working"] * 2 + ["top_up_failed"] * 2


def test_influence_selector_reads_validation_from_a_benchmark_and_a_file(pool, data_dir):
    a = get_selector("influence", validation="benchmark:banking77_10shot", validation_size=300).fit(pool)
    assert a.fit_info_["train"] == len(pool) and a.fit_info_["validation"] == 300
    path = data_dir / "dialoglue_splits" / "banking" / "val.csv"
    # The caller loads a file; the selector takes the examples.
    b = get_selector("influence", validation=load_examples(path, label_field="category"), validation_size=300).fit(pool)
    assert b.ranked_ == a.ranked_ and b.fit_info_["converged"]
    with pytest.raises(Exception, match="category|label"):
        get_selector("influence", validation=str(path)).fit(pool)  # the file has no 'label' column


def test_influence_solve_that_does_not_converge_warns_once_and_is_recorded(pool, monkeypatch):
    from iclcls.select import influence as mod

    fit = mod.SoftmaxRegression.fit
    monkeypatch.setattr(mod.SoftmaxRegression, "fit", lambda self: fit(self, max_iter=1))
    monkeypatch.setattr(mod, "_warned", set())
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        a = get_selector("influence", seed=1).fit(pool)
        b = get_selector("influence", seed=2).fit(pool)
    assert len([w for w in caught if "did not converge" in str(w.message)]) == 1
    assert a.fit_info_["converged"] is False and b.fit_info_["converged"] is False


def test_influence_state_round_trips_through_the_classifier_without_refitting(banking, embedder, tmp_path):
    clf = ICLClassifier(embedder=embedder, select={"name": "influence", "seed": 2}, rank="retriever")
    clf.fit(banking.train)
    clf.save(tmp_path / "state")
    loaded = ICLClassifier.load(tmp_path / "state", embedder=embedder)
    assert loaded.selector_.ranked_ == clf.selector_.ranked_
    assert loaded.selector_.fit_info_ == clf.selector_.fit_info_
    assert loaded.selector_.chosen(16) == clf.selector_.chosen(16)


# ---- many-shot -------------------------------------------------------------------------------


def test_many_shot_gives_every_query_the_same_prefix(pool):
    q = queries(pool, ["a", "b", "c"])
    rnd = get_selector("many_shot", seed=0).fit(pool)
    out = rnd.select(q, [None] * 3, 24)
    assert out[0] == out[1] == out[2] and len(set(out[0])) == 24
    assert rnd.select(q[:1], [None], 8)[0] == out[0][:8], "more shots extend the same prefix"
    assert get_selector("many_shot", seed=1).fit(pool).select(q[:1], [None], 24)[0] != out[0]
    bal = get_selector("many_shot", order="class_balanced").fit(pool).select(q[:1], [None], 77)[0]
    assert len({pool.examples[i].label for i in bal}) == 77
    with pytest.raises(ValueError, match="order"):
        get_selector("many_shot", order="sorted")


def test_many_shot_fills_a_token_budget(pool):
    sel = get_selector("many_shot", budget_tokens=300).fit(pool)
    ids = sel.select(queries(pool, ["x"]), [None], 1000)[0]
    used = sum(sel._tokens(i) for i in ids)
    assert 0 < used <= 300 and used + sel._tokens(sel.order_[len(ids)]) > 300


def test_many_shot_state_round_trips(banking, embedder, tmp_path):
    clf = ICLClassifier(embedder=embedder, select={"name": "many_shot", "order": "class_balanced", "seed": 5},
                        rank="retriever").fit(banking.train)
    clf.save(tmp_path / "s")
    loaded = ICLClassifier.load(tmp_path / "s", embedder=embedder)
    assert loaded.selector_.order_ == clf.selector_.order_


# ---- query batching: the parser -----------------------------------------------------------------


def test_parse_indexed_answers():
    from iclcls.rank.query_batch import parse_indexed

    text = "1: card arrival\n2. top up failed\nnoise\n3) \n4 - pin blocked\n2: again\n9: out of range"
    assert parse_indexed(text, 4) == {1: "card arrival", 2: "top up failed", 4: "pin blocked"}


# ---- with the real LM ------------------------------------------------------------------------------


@pytest.mark.slow
def test_many_shot_prompts_share_a_prefix_that_the_lm_reuses(banking, embedder, smollm):
    test = subset(banking.test, 4, 0)
    kwargs = dict(embedder=embedder, lm=smollm, shortlist_k=5, shots=6, rank="likelihood",
                  prompt={"template": "classify_demos_first"})
    clf = ICLClassifier(select={"name": "many_shot", "order": "class_balanced"}, batch_size=2, **kwargs)
    clf.fit(banking.train)
    smollm.clear_prefix_cache()
    preds = clf.predict_detailed(test)
    prompts = [p.trace["prompt"] for p in preds]
    demos = {tuple(d.text for d in p.demonstrations) for p in preds}
    assert len(demos) == 1 and len(demos.pop()) == 6
    (prefix,) = smollm._prefixes  # the one demonstrations prefix, cached across both batches
    assert all(p.startswith(prefix) for p in prompts) and prefix.count("Input:") == 6
    # The ranker finds that prefix from the prompts' demonstrations and the template alone.
    from iclcls.prompt import RenderedPrompt
    from iclcls.rank.base import RankContext
    from iclcls.rank.likelihood import shared_prefix

    ids = clf.selector_.select([None], [None], 6)[0]
    cands = [Candidates(list(p.candidates), np.zeros(len(p.candidates))) for p in preds]
    ctx = RankContext(smollm, [], cands, [RenderedPrompt(t, 0, ids) for t in prompts], clf.builder_, clf.pool_)
    assert shared_prefix(ctx) == prefix
    # The same prompts scored without the shared prefix give the same scores.
    plain = smollm.score_batch([(p, [" card arrival", " top up failed"]) for p in prompts])
    reuse = smollm.score_batch([(p, [" card arrival", " top up failed"]) for p in prompts], shared_prefix=prefix)
    for a, b in zip(plain, reuse):
        for x, y in zip(a, b):
            assert np.allclose(x, y, atol=2e-3)
    knn = ICLClassifier(select="knn", **kwargs).fit(banking.train)
    smollm.clear_prefix_cache()
    knn.predict_detailed(test[:2])
    assert not smollm._prefixes, "per-query demonstrations: no shared prefix is passed"


@pytest.mark.slow
def test_ceil_trains_an_adapter_from_lm_scored_sets_and_saves_it(banking, embedder, smollm, tmp_path):
    sel = get_selector("ceil", train_queries=6, subsets=4, subset_size=2, neighbours=8, epochs=4, lr=5e-3)
    # The selector trains with the classifier's LM (the retriever ranker alone needs none).
    clf = ICLClassifier(embedder=embedder, lm=smollm, select=sel, rank="retriever").fit(banking.train, tune="none")
    stats = clf.selector_.train_stats_
    assert stats["train_queries"] == 6 and stats["subsets"] == 4
    assert stats["loss_last_epoch"] <= stats["loss_first_epoch"]
    adapter = clf.selector_.adapter_
    assert adapter.shape == (384, 384) and not np.allclose(adapter, np.eye(384))
    q = queries(clf.pool_, ["my card has not arrived yet"])
    ids = clf.selector_.select(q, [None], 4)[0]
    assert len(ids) == 4
    clf.save(tmp_path / "ceil")
    assert (tmp_path / "ceil" / "stages" / "select.adapter.npy").is_file()
    loaded = ICLClassifier.load(tmp_path / "ceil", embedder=embedder)  # no LM needed: nothing retrains
    assert np.array_equal(loaded.selector_.adapter_, adapter)
    assert loaded.selector_.select(q, [None], 4)[0] == ids


@pytest.mark.slow
def test_batched_generative_ranker_answers_several_queries_per_call(banking, embedder, smollm):
    test = subset(banking.test, 3, 1)
    clf = ICLClassifier(embedder=embedder, lm=smollm, shortlist_k=4, select="many_shot", shots=4,
                        rank={"name": "batched_generative", "queries_per_call": 3, "retries": 1},
                        prompt={"template": "classify_demos_first"}).fit(banking.train)
    calls = []
    real = smollm.generate

    def counting(prompts, **kw):
        calls.append(len(prompts))
        return real(prompts, **kw)

    smollm.generate = counting
    try:
        preds = clf.predict_detailed(test)
    finally:
        del smollm.generate
    assert calls[0] == 1, "three queries, one prompt"
    assert len(calls) <= 2
    for p in preds:
        assert set(p.candidates) <= set(p.labels)
        assert p.trace["ranker"] == "batched_generative" and p.trace["attempts"] >= 1
