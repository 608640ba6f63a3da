"""The in-process vLLM engine on the real SmolLM2 (float32, converted from its GGUF).

Scores are checked against TransformersLM on the same converted weights. Measured on
this CPU: per-token differences up to ~1e-5 nats (float32 kernels that sum in a different
order); TOL leaves two orders of magnitude of headroom while a wrong token split, an
off-by-one position or a cached garbage row moves a value by whole nats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from iclcls.lm.base import LM, CapabilityError
from iclcls.lm.vllm_engine import continuation_start, prefix_order

REPO = Path(__file__).resolve().parents[1]

TOL = 2e-3  # nats per token; see the module docstring

LONG = (
    "You sort customer messages into topics. Each message gets exactly one topic from the "
    "list: billing, shipping, returns, account, technical support, other. "
) * 5
REQUESTS = [
    (LONG + "Message: my parcel never arrived\nTopic:", [" shipping", " billing", " returns", " other"]),
    ("Review: a dull, lifeless film.\nSentiment:", [" negative", " positive", " very negative"]),
    ("Answer: ", ["yes", "no"]),  # the boundary space merges into the label's first token
    ("Q: What is the capital of France?\nA:", [" Paris", " The capital of France is Paris."]),
    ("", ["Hello world"]),  # empty prompt: a start token precedes the continuation
]


# -- pure helpers (fast) -------------------------------------------------------------------


def test_continuation_start_puts_a_boundary_straddling_token_in_the_continuation():
    # "Answer: yes" as "Answer", ":", " yes": the prompt ends inside " yes".
    offsets = [(0, 6), (6, 7), (7, 11)]
    assert continuation_start(offsets, len("Answer: ")) == 2
    assert continuation_start(offsets, len("Answer:")) == 2
    assert continuation_start(offsets, len("Answer")) == 1
    assert continuation_start([(0, 0), (0, 5)], 0) == 1  # a BOS (zero width) stays in the prompt
    assert continuation_start(offsets, 11) == 3  # empty continuation: no tokens


def test_prefix_order_puts_sequences_sharing_a_prefix_next_to_each_other():
    seqs = [(1, 2, 9), (5, 5), (1, 2, 3), (5, 4), (1, 7)]
    order = prefix_order(seqs)
    assert [seqs[i] for i in order] == [(1, 2, 3), (1, 2, 9), (1, 7), (5, 4), (5, 5)]


def _run_script(path: Path, body: str, *, timeout: float) -> subprocess.CompletedProcess:
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=timeout, env=env, cwd=path.parent
    )


def test_unguarded_main_line_finds_top_level_calls_outside_the_main_guard(tmp_path):
    out = _run_script(tmp_path / "script.py", """
        from iclcls.lm.vllm_engine import unguarded_main_line

        def build():
            return unguarded_main_line()

        print("top", build())
        if __name__ == "__main__":
            print("guarded", build())
        if "__main__" == __name__:
            def main():
                return build()
            print("guarded-reversed", main())
        if __name__ != "__main__":
            pass
        else:
            print("else-branch", build())
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["top"] == f"{tmp_path / 'script.py'}:7"
    assert lines["guarded"] == "None" and lines["guarded-reversed"] == "None"
    # An `else` under a negated test is not recognised as a guard: the engine then runs
    # in-process, which is safe, merely not the fastest.
    assert lines["else-branch"].endswith("script.py:17")
    code = "from iclcls.lm.vllm_engine import unguarded_main_line as u; print(u())"
    interactive = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    assert interactive.stdout.strip() == "None", interactive.stderr[-2000:]


# -- the engine (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_engine_basics(vllm_lm):
    assert isinstance(vllm_lm, LM)
    assert vllm_lm.name == "vllm:smollm2-135m-instruct"
    assert vllm_lm.context_window == 2048
    assert vllm_lm.count_tokens("") == 0
    assert 1 <= vllm_lm.count_tokens("Hello world") <= 3
    empty, good = vllm_lm.score_batch([("Sentiment:", ["", " good"]), ("x", [])])[0]
    assert empty.shape == (0,) and good.shape == (1,) and good[0] < 0
    assert vllm_lm.score_batch([]) == []


@pytest.mark.slow
def test_generate_greedy_is_deterministic_and_honours_stop(vllm_lm):
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    out = vllm_lm.generate(prompts, max_tokens=8)
    assert "Paris" in out[0]
    assert "5" in out[1]
    assert vllm_lm.generate(prompts, max_tokens=8) == out
    stopped = vllm_lm.generate(["1, 2, 3, 4,"], max_tokens=16, stop=[","])
    assert "," not in stopped[0] and "5" in stopped[0]


@pytest.mark.slow
def test_choices_constrain_the_answer(vllm_lm):
    prompts = [
        "Review: I loved every minute of it.\nSentiment (positive or negative):",
        "Review: awful, boring, a waste of time.\nSentiment (positive or negative):",
        "Tell me a long story about dragons.",
    ]
    free = vllm_lm.generate(prompts[2:], max_tokens=4)
    choices = ["positive", "negative", "very negative"]
    out = vllm_lm.generate(prompts, choices=choices, max_tokens=2)
    assert all(o in choices for o in out), out
    assert free[0] not in choices  # the constraint, not the prompt, made it a choice
    # With one-token choices, greedy constrained decoding picks the likeliest choice.
    pair = ["positive", "negative"]
    assert all(vllm_lm.count_tokens(c) == 1 for c in pair)
    picked = vllm_lm.generate(prompts[:2], choices=pair)
    scores = vllm_lm.score_batch([(p, pair) for p in prompts[:2]])
    assert picked == [pair[int(np.argmax([t.sum() for t in s]))] for s in scores]


@pytest.mark.slow
def test_chat_replies_and_refuses_images_on_a_text_model(vllm_lm, tmp_path):
    reply = vllm_lm.chat([[{"role": "user", "content": "What is 2+2? Answer with a number."}]], max_tokens=12)
    assert "4" in reply[0]
    image = {"type": "image", "image": b"\x89PNG\r\n\x1a\n" + b"\0" * 16}
    with pytest.raises(CapabilityError, match="text-only"):
        vllm_lm.chat([[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]])


@pytest.mark.slow
def test_scores_agree_with_transformers_on_the_same_weights(vllm_lm, smollm):
    ours = vllm_lm.score_batch(REQUESTS)
    ref = smollm.score_batch(REQUESTS)
    worst = 0.0
    for (prompt, conts), a_req, b_req in zip(REQUESTS, ours, ref):
        for cont, a, b in zip(conts, a_req, b_req):
            assert a.shape == b.shape, (prompt[-20:], cont)  # the same tokens were scored
            assert len(a) >= 1 and np.all(a <= 0)
            worst = max(worst, float(np.max(np.abs(a - b))))
    print(f"\nvLLM vs transformers: max |delta logprob| per token = {worst:.2e} nats")
    assert worst < TOL
    # The straddling token " yes" is one token scored after "Answer:".
    assert len(ours[2][0]) == 1
    # Multi-token continuations are scored token by token.
    assert len(ours[1][2]) == len(ours[1][0]) + 1  # " very negative"


@pytest.mark.slow
def test_score_order_does_not_matter_and_prefix_cache_is_reused(vllm_lm):
    first = vllm_lm.score_batch(REQUESTS)
    stats = vllm_lm.last_score_stats
    # LONG is > 128 tokens: it is prefilled once to warm the cache, then each of its 4
    # continuations reads >= 128 tokens from cached blocks (32-token blocks on CPU, 16 on a GPU).
    assert stats["warmed_prompts"] >= 1 and stats["rescored"] == 0, stats
    assert stats["cached_tokens"] >= 4 * 128, stats
    again = vllm_lm.score_batch(REQUESTS[::-1])[::-1]
    for a_req, b_req in zip(first, again):
        for a, b in zip(a_req, b_req):
            np.testing.assert_allclose(a, b, atol=TOL)


@pytest.mark.slow
def test_cached_continuation_positions_are_rescored(vllm_lm, smollm):
    """A continuation whose tokens are already in the prefix cache (from an earlier call)
    gets no prompt logprobs from vLLM there; the engine must notice and score it again."""
    long_prompt = LONG + "Message: I was charged twice\nTopic:"
    vllm_lm.score_batch([(long_prompt, [" billing"])])  # caches long_prompt's full blocks
    short, rest = "You sort", long_prompt[len("You sort") :] + " billing"
    ours = vllm_lm.score_batch([(short, [rest])])[0][0]
    assert vllm_lm.last_score_stats["rescored"] == 1
    ref = smollm.score_batch([(short, [rest])])[0][0]
    assert ours.shape == ref.shape and len(ours) > 128
    np.testing.assert_allclose(ours, ref, atol=TOL)


@pytest.mark.slow
def test_score_rejects_a_sequence_over_the_context_window(vllm_lm):
    with pytest.raises(ValueError, match="context window of 2048"):
        vllm_lm.score_batch([("word " * 3000, [" end"])])


@pytest.mark.slow
def test_a_plain_script_without_a_main_guard_classifies_with_the_engine(tmp_path, smollm2_hf_dir):
    """What a new user writes: no `if __name__ == "__main__":`. vLLM's spawned worker would
    re-run the script and die in multiprocessing's bootstrapping check; the engine notices the
    unguarded call and runs in-process instead, with a warning that says how to get the worker."""
    pytest.importorskip("vllm")
    out = _run_script(tmp_path / "classify.py", f"""
        import json
        from iclcls import ICLClassifier
        from iclcls.data import load_benchmark

        data = load_benchmark("sample")
        clf = ICLClassifier(lm="vllm:{smollm2_hf_dir}", shortlist_k=3, shots=2).fit(data.train)
        preds = clf.predict_detailed([e.text for e in data.test[:2]])
        print("IN_PROCESS", clf.lm_.in_process)
        print("LABELS", json.dumps([p.label for p in preds]))
        print("CLASSES", json.dumps(sorted(clf.classes_)))
        clf.lm_.close()
    """, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    assert "bootstrapping phase" not in out.stderr
    assert "outside an `if __name__ == \"__main__\":` block" in out.stderr
    assert "IN_PROCESS True" in out.stdout
    labels = json.loads(out.stdout.split("LABELS ", 1)[1].splitlines()[0])
    classes = json.loads(out.stdout.split("CLASSES ", 1)[1].splitlines()[0])
    assert len(labels) == 2 and set(labels) <= set(classes)
