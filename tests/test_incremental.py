"""Adding classes costs the new data: incremental stages equal a classifier fit on everything."""

from __future__ import annotations

import numpy as np
import pytest

from iclcls import Example, ICLClassifier
from iclcls.pool import Pool
from iclcls.types import Candidates
from iclcls.util import GrowingArray


@pytest.fixture(scope="module")
def banking(data_dir):
    from iclcls.data import load_benchmark
    from iclcls.experiment import subset

    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b.train, subset(b.test, 150, 1)


@pytest.mark.parametrize("shortlist", ["knn_vote", "class_mean", "ecl"])
def test_classes_added_one_by_one_equal_a_fit_on_everything(banking, embedder, shortlist):
    train, test = banking
    labels = sorted({ex.label for ex in train})
    first = set(labels[:60])
    base = [ex for ex in train if ex.label in first]
    later = [ex for ex in train if ex.label not in first]
    opts = dict(lm=None, embedder=embedder, shortlist=shortlist, shortlist_k=10, select="knn", shots=4,
                rank="retriever", show_progress=False)
    grown = ICLClassifier(**opts).fit(base, tune="none")
    for lab in labels[60:]:
        grown.add_classes([ex for ex in later if ex.label == lab])
    extra = [Example(ex.text + " please", ex.labels) for ex in base[:3]]  # more examples of old classes
    grown.add_examples(extra)
    if shortlist == "ecl":
        grown.shortlister_.rewhiten_all()  # deferred whitening, caught up (bounded drift until then)
    full = ICLClassifier(**opts).fit(base + later + extra, tune="none")
    assert grown.pool_.embeddings.shape == full.pool_.embeddings.shape
    np.testing.assert_allclose(grown.pool_.embeddings, full.pool_.embeddings, atol=1e-6)
    texts = [ex.text for ex in test]
    for g, f in zip(grown.shortlist_candidates(texts), full.shortlist_candidates(texts)):
        assert g.labels == f.labels
        np.testing.assert_allclose(g.scores, f.scores, atol=1e-5)
    gp, fp = grown.predict_detailed(texts), full.predict_detailed(texts)
    assert [p.labels for p in gp] == [p.labels for p in fp]
    assert [p.demonstrations for p in gp] == [p.demonstrations for p in fp]


def test_pool_growth_copies_only_new_rows(embedder):
    pool = Pool(embedder)
    vecs = np.eye(8, dtype=np.float32)
    pool.extend([Example(f"t{i}", ("a",)) for i in range(2)], vecs[:2])
    buf = pool._emb
    pool.extend([Example("t2", ("b",))], vecs[2:3])  # grows (capacity doubles) ...
    grown = pool._emb
    assert len(grown) >= 4 and grown is not buf
    pool.extend([Example("t3", ("b",))], vecs[3:4])  # ... then fills in place
    assert pool._emb is grown
    np.testing.assert_array_equal(pool.embeddings, vecs[:4])
    labels, means = pool.class_means()
    assert labels == ["a", "b"]
    np.testing.assert_allclose(means[1], (vecs[2] + vecs[3]) / np.linalg.norm(vecs[2] + vecs[3]), atol=1e-6)


def test_growing_array_appends_and_sets():
    a = GrowingArray(2)
    a.append(np.ones((3, 2)))
    a.append(np.zeros((5, 2)))
    a.set(np.array([0]), np.array([[7, 7]]))
    assert a.view.shape == (8, 2) and a.view[0, 0] == 7 and a.view[3, 0] == 0


def test_influence_takes_additions_at_once_and_is_refreshed_off_lock(banking, embedder):
    train, test = banking
    labels = sorted({ex.label for ex in train})
    base = [ex for ex in train if ex.label in set(labels[:20])]
    clf = ICLClassifier(lm=None, embedder=embedder, shortlist="knn_vote", shortlist_k=5, shots=4, rank="retriever",
                        select={"name": "influence", "validation": "holdout", "restrict_to_candidates": True}, show_progress=False).fit(base, tune="none")
    sel = clf.selector_
    assert sel.incremental is False and not sel.stale_ and sel.fit_info_["refreshed_at"]
    new = [ex for ex in train if ex.label == labels[20]]
    clf.add_classes(new)
    assert clf.selector_ is sel and sel.stale_ and sel.fit_info_["stale_examples"] == len(new)
    new_ids = set(range(len(base), len(base) + len(new)))
    cands = clf.shortlist_candidates([new[0].text])
    assert labels[20] in cands[0].labels
    only_new = [Candidates([labels[20]], np.zeros(1))]
    assert set(sel.select(clf._queries([new[0]]), only_new, 2)[0]) <= new_ids  # the new class can be shown at once
    swaps = []

    class Lock:
        def __enter__(self):
            swaps.append(1)

        def __exit__(self, *exc):
            return False

    assert clf.refresh_stale(swap=Lock) == ["InfluenceSelector"]
    assert swaps == [1] and clf.selector_ is not sel and not clf.selector_.stale_
    assert clf.selector_.pool_ is clf.pool_ and set(clf.selector_.ranked_) & new_ids  # re-solved with the new class
    assert clf.refresh_stale() == []  # nothing stale now
