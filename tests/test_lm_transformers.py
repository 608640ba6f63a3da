"""The transformers backend's shared-KV scoring is exact: it equals one forward per continuation."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from iclcls.lm.transformers_lm import TransformersLM, gguf_metadata_value

TOL = 1e-3

# Prompts with K = 2..12 continuations of different lengths: with and without a leading
# space, punctuation that can merge with the prompt's last characters, multi-token labels.
CASES = [
    ("The capital of France is", [" Paris", " a banana split"]),
    ("Intent:", [" card_arrival", "card_arrival", " lost_or_stolen_card", ":)", "::"]),
    (
        "Classify the message.\nMessage: where is my new card?\nLabel: ",
        ["card_arrival", " card_arrival", "card arrival", "Card_Arrival", "?", ".", "\n", "card_delivery_estimate"],
    ),
    (
        "Q: Which number comes after 41?\nA (",
        [
            "42)",
            "a) 42",
            "b",
            " 42",
            "forty-two",
            "",
            "...",
            "42",
            "(42)",
            "4",
            "!!!",
            " the number forty two, of course.",
        ],
    ),
]


def assert_close_lists(got, want, tol=TOL):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=tol)


PATHS = [("tree", "packed"), ("per_request", "packed"), ("per_request", "batched")]


@pytest.fixture(params=PATHS, ids=["tree", "per_request-packed", "per_request-batched"])
def suffix_mode(request, smollm, monkeypatch) -> str:
    """Run a test on each scoring path: many requests per forward (tree), or one prefill per
    request with its suffixes packed (tree mask) or batched (padded rows)."""
    batch_mode, suffix = request.param
    monkeypatch.setattr(smollm, "batch_mode", batch_mode)
    monkeypatch.setattr(smollm, "suffix_mode", suffix)
    return suffix


@pytest.mark.parametrize("prompt,conts", CASES, ids=[f"K={len(c)}" for _, c in CASES])
def test_shared_kv_score_equals_naive(smollm, suffix_mode, prompt, conts):
    got = smollm.score_tokens(prompt, conts)
    want = smollm.score_naive(prompt, conts)
    assert_close_lists(got, want)
    assert [len(t) for t in got] == [len(t) for t in want]
    assert any(len(t) > 1 for t in got)  # multi-token continuations exercise the suffix batch


def test_suffix_batches_in_chunks_match(smollm, suffix_mode, monkeypatch):
    prompt, conts = CASES[3]
    monkeypatch.setattr(smollm, "max_batch_size", 3)  # 12 continuations -> 4 suffix passes, one prefix
    assert_close_lists(smollm.score_tokens(prompt, conts), smollm.score_naive(prompt, conts))


def test_batch_of_requests_with_shared_and_duplicate_continuations(smollm, suffix_mode):
    labels = [" card_arrival", " card_linking", " card_arrival"]
    requests = [("Label for 'my card has not come':", labels), ("Label for 'link my card':", labels), ("x", [])]
    got = smollm.score_batch(requests)
    assert got[2] == []
    np.testing.assert_array_equal(got[0][0], got[0][2])  # duplicate continuation, same scores
    for (prompt, conts), scores in zip(requests[:2], got[:2]):
        assert_close_lists(scores, smollm.score_naive(prompt, conts))
    assert not np.allclose(got[0][0], got[1][0])  # same label, different prompt


def varied_requests(data_dir):
    """Prompts of 5-300 tokens, 0-12 candidates, single- and multi-token labels, duplicates."""
    rows = list(csv.DictReader(open(data_dir / "dialoglue_splits" / "banking" / "train_10.csv", newline="")))
    labels = sorted({r["category"] for r in rows})
    reqs = []
    for i in range(14):
        demos = "".join(f"Message: {r['text']}\nIntent: {r['category']}\n" for r in rows[i * 7 : i * 7 + i % 9])
        cands = [" " + labels[(i * 5 + k) % len(labels)] for k in range(i % 13)]
        if i % 4 == 1:
            cands += cands[:2] + ["", " x", "?"]  # duplicates, an empty and single-token continuations
        reqs.append((f"Classify.\n{demos}Message: {rows[200 + i]['text']}\nIntent:", cands))
    reqs += [("", ["Hello world", "", " x"]), ("x", [])]
    return reqs


@pytest.mark.parametrize("budget", [64, 2048])
def test_batched_requests_equal_the_per_request_path(smollm, data_dir, monkeypatch, budget):
    """Scores of many requests per forward equal one prefill per request (1e-4, float32),
    so every saved result stays valid; a small token budget splits the batch into chunks."""
    reqs = varied_requests(data_dir)
    monkeypatch.setattr(smollm, "batch_mode", "per_request")
    want = smollm.score_batch(reqs)
    monkeypatch.setattr(smollm, "batch_mode", "tree")
    monkeypatch.setattr(smollm, "max_batch_tokens", budget)
    got = smollm.score_batch(reqs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close_lists(g, w, tol=1e-4)
    assert sum(len(t) > 1 for g in got for t in g) > 10  # multi-token labels exercised


def test_bad_batch_mode_is_rejected(smollm):
    with pytest.raises(ValueError, match="batch_mode"):
        smollm._choose_batch_mode("rows")


def test_empty_prompt_and_empty_continuation(smollm):
    got = smollm.score_tokens("", ["Hello world", "", " x"])
    assert len(got[1]) == 0
    assert_close_lists(got, smollm.score_naive("", ["Hello world", "", " x"]))


def demo_prefix(data_dir, n=12) -> str:
    with open(data_dir / "dialoglue_splits" / "banking" / "train_10.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::10][:n]
    demos = "".join(f"Message: {r['text']}\nIntent: {r['category']}\n\n" for r in rows)
    return "Classify each banking message by its intent.\n\n" + demos


def test_shared_prefix_equals_plain_path(smollm, suffix_mode, data_dir):
    prefix = demo_prefix(data_dir)
    labels = [" card_arrival", " Refund_not_showing_up", " lost_or_stolen_card", " exchange_rate"]
    requests = [
        (prefix + f"Message: {q}\nIntent:", labels)
        for q in ["I still have not received my card", "where is my refund?", "someone stole my wallet"]
    ]
    smollm.clear_prefix_cache()
    plain = smollm.score_batch(requests)
    shared = smollm.score_batch(requests, shared_prefix=prefix)
    assert prefix in smollm._prefixes  # kept for the next call
    again = smollm.score_batch(requests[:1], shared_prefix=prefix)
    for p, s in zip(plain, shared):
        assert_close_lists(s, p)
    assert_close_lists(again[0], plain[0])


@pytest.mark.parametrize("batch_mode", ["tree", "per_request"])
def test_shared_prefix_merging_at_the_boundary(smollm, monkeypatch, batch_mode):
    monkeypatch.setattr(smollm, "batch_mode", batch_mode)
    # The prefix ends mid-word: "...Intent: car" + "d_arrival..." re-tokenises across the
    # boundary, so the cached prefix must be cropped before reuse.
    prefix = "Messages about cards.\nIntent: car"
    requests = [(prefix + "d_arrival\nIntent:", [" card_arrival", " top_up"]), (prefix + "pet\nNext:", [" yes"])]
    prefix_ids = smollm._encode_text(prefix)
    assert smollm._encode_text(requests[0][0])[: len(prefix_ids)] != prefix_ids
    plain = smollm.score_batch(requests)
    shared = smollm.score_batch(requests, shared_prefix=prefix)
    for p, s in zip(plain, shared):
        assert_close_lists(s, p)


def test_shared_prefix_must_prefix_every_prompt(smollm):
    with pytest.raises(ValueError, match="request 1.*shared_prefix"):
        smollm.score_batch([("AB: x", [" y"]), ("CD: x", [" y"])], shared_prefix="AB:")


def test_prompt_longer_than_context_window_is_a_clear_error(smollm):
    prompt = "word " * (smollm.context_window + 10)
    with pytest.raises(ValueError, match="context window of 8192"):
        smollm.score(prompt, [" yes"])
    with pytest.raises(ValueError, match="context window"):
        smollm.generate([prompt], max_tokens=4)


def test_packed_mode_with_eager_attention_equals_naive():
    # Eager attention takes an additive float mask, SDPA a boolean one: both must isolate branches.
    lm = TransformersLM.from_name("smollm2", attn_implementation="eager")
    assert lm.suffix_mode == "packed"
    prompt, conts = CASES[2]
    assert_close_lists(lm.score_tokens(prompt, conts), lm.score_naive(prompt, conts))


def test_bad_suffix_mode_is_rejected(smollm):
    with pytest.raises(ValueError, match="suffix_mode"):
        smollm._choose_suffix_mode("tree")


def test_generate_with_choices_picks_the_likeliest(smollm):
    out = smollm.generate(["The capital of France is", "Monday, Tuesday, Wednesday,"], choices=[" Paris", " Thursday"])
    assert out == [" Paris", " Thursday"]


def test_name_and_counts(smollm):
    assert smollm.name == "transformers:smollm2-135m-instruct"
    assert smollm.count_tokens("") == 0
    assert smollm.count_tokens(" Paris") == 1


@pytest.mark.slow
def test_gemma3_270m_loads_and_scores_exactly():
    lm = TransformersLM.from_name("gemma3-270m")
    assert lm.name == "transformers:gemma3-270m"
    assert gguf_metadata_value(lm.source.gguf_path, "tokenizer.ggml.add_bos_token") is True
    prompt = "The capital of France is"
    right, wrong = lm.score(prompt, [" Paris", " banana"])
    assert right > wrong + 3.0
    # BOS is prepended (Gemma needs it) identically on both paths; beyond the 512-token
    # sliding window the shared path must still match.
    long_prompt = "Example: the sky is blue.\n" * 90 + "Answer:"
    assert lm.count_tokens(long_prompt) > 512
    assert lm.suffix_mode == "packed" and "sliding_attention" in lm._layer_kinds
    conts = [" Paris", " yes", " no, it is not", "!"]
    for p in (prompt, long_prompt):
        want = lm.score_naive(p, conts)
        for batch_mode, mode in PATHS:
            lm.batch_mode, lm.suffix_mode = batch_mode, mode
            assert_close_lists(lm.score_tokens(p, conts), want)
    lm.batch_mode = "tree"  # both prompts in one forward: sliding and full layers in one tree mask
    both = lm.score_batch([(prompt, conts), (long_prompt, conts)])
    assert_close_lists(both[1], lm.score_naive(long_prompt, conts))
