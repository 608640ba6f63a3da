"""ICLClassifier end to end on the served backends: the in-process vLLM engine and a vLLM
OpenAI-compatible server on 127.0.0.1, against the transformers backend on the same weights.

20 BANKING77 test queries, kNN-vote shortlist of 10, 4 kNN demonstrations, likelihood rank.
Every backend must pick the same label for every query, from the same shortlist and the same
demonstrations, and agree on every candidate's normalised score within SCORE_TOL.
Measured here: per-token log-prob differences up to ~1e-5 nats (float32 kernels summing in a
different order), so a label's score (a sum over its few tokens, renormalised over 10
candidates) moves by well under 1e-4; SCORE_TOL leaves an order of magnitude of headroom
while a wrong token split or a cached garbage row moves a score by whole nats.

Uses the session's one engine and one server (tests/fixtures_lm_servers.py); starts none.
"""

from __future__ import annotations

import numpy as np
import pytest

from iclcls import ICLClassifier
from iclcls.data import load_benchmark
from iclcls.experiment import subset

pytestmark = pytest.mark.slow

SCORE_TOL = 1e-3  # normalised log-prob per candidate; see the module docstring
N_QUERIES, SHORTLIST, SHOTS = 20, 10, 4


@pytest.fixture(scope="module")
def banking(data_dir):
    b = load_benchmark("banking77_10shot", data_dir=data_dir)
    return b.train, subset(b.test, N_QUERIES, 7)


def _classify(lm, embedder, banking):
    train, test = banking
    clf = ICLClassifier(
        lm=lm, embedder=embedder, shortlist="knn_vote", shortlist_k=SHORTLIST, select="knn",
        shots=SHOTS, rank="likelihood", batch_size=N_QUERIES, show_progress=False,
    ).fit(train)
    return clf, clf.predict_detailed([e.text for e in test])


@pytest.fixture(scope="module")
def reference(smollm, embedder, banking):
    return _classify(smollm, embedder, banking)[1]


def _agree(preds, ref, banking) -> float:
    """Assert same prediction, shortlist and demonstrations per query; return the worst score gap."""
    assert len(preds) == len(ref) == N_QUERIES
    worst = 0.0
    for i, (p, r) in enumerate(zip(preds, ref)):
        assert p.candidates == r.candidates and len(p.candidates) == SHORTLIST, i
        assert [d.text for d in p.demonstrations] == [d.text for d in r.demonstrations], i
        assert p.label == r.label, (i, p.labels[:3], r.labels[:3], p.scores[:3], r.scores[:3])
        ours, theirs = dict(zip(p.labels, p.scores)), dict(zip(r.labels, r.scores))
        worst = max(worst, max(abs(ours[lab] - theirs[lab]) for lab in r.labels))
    assert worst < SCORE_TOL, worst
    acc = np.mean([p.label == e.label for p, e in zip(ref, banking[1])])
    assert acc >= 0.4, f"SmolLM2 on a 10-label shortlist should be far above chance: {acc}"
    return worst


def test_engine_classifies_like_transformers_in_one_scoring_call(vllm_lm, embedder, banking, reference):
    clf, preds = _classify(vllm_lm, embedder, banking)
    worst = _agree(preds, reference, banking)
    stats = vllm_lm.last_score_stats
    # One predict batch -> one score_batch: all 20 x 10 (query, label) sequences together,
    # their prompts' full KV blocks read from the prefix cache after one warm-up prefill each.
    # A few sequences get a cached block that reaches into their label (written by a sibling
    # label with the same first tokens) and are scored again uncached: "rescored".
    assert stats["sequences"] == N_QUERIES * SHORTLIST, stats
    assert stats["warmed_prompts"] == N_QUERIES, stats
    assert stats["rescored"] <= stats["sequences"] // 10, stats
    assert stats["cached_tokens"] >= (stats["sequences"] - stats["rescored"]) * 128, stats
    print(f"\nvLLM engine vs transformers: max |delta score| = {worst:.2e}; {stats}")


def test_server_classifies_like_transformers(vllm_server, embedder, banking, reference):
    from iclcls.lm import get_lm

    # What a user passes as lm=, built here to give it a long per-request timeout: the
    # server recomputes every (prompt, label) sequence (vLLM never reads its prefix cache
    # for prompt log-probs), and on this shared 2-core box 8 such requests in flight took
    # over the 60 s default.
    lm = get_lm(f"openai:{vllm_server.model}@{vllm_server.base_url}", timeout=900, max_retries=0)
    try:
        assert lm.name == f"openai:{vllm_server.model}"
        _, preds = _classify(lm, embedder, banking)
        worst = _agree(preds, reference, banking)
    finally:
        lm.close()
    print(f"\nvLLM server vs transformers: max |delta score| = {worst:.2e}")
