"""Batch calibration of the likelihood ranker: control flow with a scripted LM."""

from __future__ import annotations

import numpy as np
import pytest
from scripted_lm import ScriptedLM

from iclcls.prompt import PromptBuilder, RenderedPrompt
from iclcls.rank import get_ranker
from iclcls.rank.base import RankContext
from iclcls.types import Candidates, Example, Query


class TableLM(ScriptedLM):
    """Scores ``label`` after a prompt by a table keyed by (query word in the prompt, label)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def score_batch(self, requests):
        out = []
        for prompt, conts in requests:
            key = next(q for q in ("q1", "q2", "q3") if q in prompt)
            out.append([np.array([self.table[key, c.strip()]]) for c in conts])
        return out


def _ctx(lm, queries):
    builder = PromptBuilder()
    qs = [Query(Example(q), np.zeros(2)) for q in queries]
    cands = [Candidates(["a", "b"], np.zeros(2)) for _ in queries]
    prompts = [RenderedPrompt(builder.render(q, [], ["a", "b"]), 3, []) for q in queries]
    return RankContext(lm, qs, cands, prompts, builder, pool=None)


def test_batch_calibration_divides_by_each_labels_mean_probability_over_the_batch():
    lm = TableLM({("q1", "a"): -1.0, ("q1", "b"): -3.0, ("q2", "a"): -1.0, ("q2", "b"): -1.2})
    plain = get_ranker("likelihood").rank(_ctx(lm, ["q1", "q2"]))
    assert [r.labels[0] for r in plain] == ["a", "a"]  # the LM prefers "a" whatever the query
    batch = get_ranker("likelihood", calibration="batch").rank(_ctx(lm, ["q1", "q2"]))
    assert [r.labels[0] for r in batch] == ["a", "b"]  # q2 is less "a" than the batch is
    p = np.exp([[-1 - np.logaddexp(-1, -3), -3 - np.logaddexp(-1, -3)], [-1 - np.logaddexp(-1, -1.2), -1.2 - np.logaddexp(-1, -1.2)]])
    expect = np.log(p[1] / p.mean(axis=0))
    expect -= np.logaddexp(*expect)
    got = dict(zip(batch[1].labels, batch[1].scores))
    assert [got["a"], got["b"]] == pytest.approx(expect.tolist())
    assert batch[1].trace["calibration"] == "batch"
    # One query alone: nothing to average over, so the ranking is the plain one.
    alone = get_ranker("likelihood", calibration="batch").rank(_ctx(lm, ["q2"]))
    assert alone[0].labels[0] == "a"
    with pytest.raises(ValueError, match="batch"):
        get_ranker("likelihood", calibration="bogus")
