"""Images end to end: image Examples, loaders, state round trip, image embedders, digits kNN.

Real images (scikit-learn's digits, PNG-encoded), real models built at test time with tiny
random weights from a config (CLIP), no downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from iclcls.data import DataError, load_examples, load_image_folder
from iclcls.data.images import digits_examples
from iclcls.data.images import few_shot_split as split
from iclcls.embed import default_embedder, encode_examples, get_embedder
from iclcls.pool import Pool
from iclcls.types import Example


@pytest.fixture(scope="module")
def digits() -> list[Example]:
    return digits_examples()




def png(value: int, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# -- Example --------------------------------------------------------------------------
def test_example_takes_an_image_without_text_and_keeps_the_text_only_forms():
    a = Example(text=None, image=b"\x89PNG...")
    assert a.text == "" and a.images == (b"\x89PNG...",)
    b = Example("hello", ("greet",))  # the positional text-only form
    assert b.text == "hello" and b.labels == ("greet",) and b.images == ()
    c = Example(text="a cat", image=Path("cat.png"), labels="cat")
    assert c.images == ("cat.png",) and c.label == "cat"
    with pytest.raises(ValueError, match="neither text nor an image"):
        Example()
    with pytest.raises(ValueError, match="neither text nor an image"):
        Example(text="  ", images=())
    with pytest.raises(TypeError, match="image 0"):
        Example(image=123)


def test_a_text_embedder_refuses_an_image_only_example():
    with pytest.raises(ValueError, match="image without text.*image embedder"):
        encode_examples(default_embedder(), [Example(image=png(3), labels="x")])


# -- loaders --------------------------------------------------------------------------
def test_image_column_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(10))
    (tmp_path / "img" / "b.png").write_bytes(png(200))
    f = tmp_path / "train.csv"
    f.write_text("image,text,label\nimg/a.png,,dark\nimg/b.png,a bright one,light\n")
    exs = load_examples(f, image_field="image")
    assert [e.label for e in exs] == ["dark", "light"]
    assert exs[0].text == "" and exs[1].text == "a bright one"
    assert Path(exs[0].images[0]).read_bytes() == png(10)
    f.write_text("image,label\nimg/a.png,dark\nimg/missing.png,light\n")
    with pytest.raises(DataError, match=r"line 3.*missing\.png"):
        load_examples(f, image_field="image", text_field=None)


def test_image_column_of_bytes_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": [png(1), png(2)], "label": ["a", "b"]}), f)
    exs = load_examples(f, image_field="image", text_field=None)
    assert [e.images[0] for e in exs] == [png(1), png(2)]
    # Hugging Face's Image feature: a {bytes, path} struct per row
    pq.write_table(pa.table({"image": [{"bytes": png(3), "path": "x.png"}], "label": ["a"]}), f)
    assert load_examples(f, image_field="image", text_field=None)[0].images == (png(3),)
    pq.write_table(pa.table({"image": [png(1), None], "label": ["a", "b"]}), f)
    with pytest.raises(DataError, match="row 2.*neither an image nor text"):
        load_examples(f, image_field="image", text_field=None)


def test_folder_per_class_layout(tmp_path):
    for lab, v in (("cat", 1), ("dog", 2)):
        (tmp_path / "train" / lab).mkdir(parents=True)
        (tmp_path / "train" / lab / f"{lab}1.png").write_bytes(png(v))
        (tmp_path / "train" / lab / "notes.txt").write_text("not an image")
    exs = load_image_folder(tmp_path / "train")
    assert [(e.id, e.label) for e in exs] == [("cat/cat1.png", "cat"), ("dog/dog1.png", "dog")]
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "train" / "cat")


# -- state ----------------------------------------------------------------------------
def test_pool_save_load_keeps_images_bit_for_bit_and_reads_only_its_folder(tmp_path):
    src = tmp_path / "seven.png"
    src.write_bytes(png(7))
    exs = [Example(image=png(1), labels="a"), Example(text="t", images=(png(2), str(src)), labels="b"),
           Example("text only", ("a",))]
    pool = Pool(get_embedder("pixels"))
    pool.extend(exs, np.eye(3, 256, dtype=np.float32))  # (the pixel embedder refuses text-only)
    pool.save(tmp_path / "state")
    stored = sorted((tmp_path / "state" / "images").iterdir())
    assert {p.name for p in stored} == {hashlib.sha256(png(v)).hexdigest() for v in (1, 2, 7)}
    src.unlink()  # a loaded state does not need (or read) the original file
    back = Pool.load(tmp_path / "state", get_embedder("pixels"))
    assert [e.images for e in back.examples] == [(png(1),), (png(2), png(7)), ()]
    assert [e.text for e in back.examples] == ["", "t", "text only"]
    np.testing.assert_array_equal(back.embeddings, pool.embeddings)

    # tampered bytes, and a record naming a file outside the state, are refused
    lines = (tmp_path / "state" / "examples.jsonl").read_text().splitlines()
    (tmp_path / "state" / "images" / hashlib.sha256(png(1)).hexdigest()).write_bytes(png(9))
    with pytest.raises(ValueError, match="line 1.*SHA-256"):
        Pool.load(tmp_path / "state", get_embedder("pixels"))
    rec = json.loads(lines[0])
    rec["images"] = [{"file": "../seven.png", "sha256": rec["images"][0]["sha256"]}]
    (tmp_path / "state" / "examples.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 1.*not inside"):
        Pool.load(tmp_path / "state", get_embedder("pixels"))
    # a local path (or an http URL) in a state is refused unless the caller trusts the state
    rec["images"] = [str(tmp_path / "seven.png")]
    (tmp_path / "state" / "examples.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    (tmp_path / "state" / "images" / hashlib.sha256(png(1)).hexdigest()).write_bytes(png(1))
    with pytest.raises(ValueError, match="line 1.*outside the state.*trust=True"):
        Pool.load(tmp_path / "state", get_embedder("pixels"))
    assert Pool.load(tmp_path / "state", get_embedder("pixels"), trust=True).examples[0].images == (str(tmp_path / "seven.png"),)


def test_classifier_with_pixels_saves_and_loads(digits, tmp_path):
    from iclcls.classifier import ICLClassifier

    pool, test = split(digits, 3)
    clf = ICLClassifier(embedder="pixels", shortlist="class_mean", rank="retriever", select=None, shots=0)
    clf.fit(pool)
    before = clf.predict_labels(test[:40])
    clf.save(tmp_path / "clf")
    back = ICLClassifier.load(tmp_path / "clf")
    assert back.predict_labels(test[:40]) == before
    assert back.pool_.examples[0].images == pool[0].images


# -- embedders ------------------------------------------------------------------------
def test_pixel_embedder_rows_and_refusals():
    emb = get_embedder("pixels:8x8")
    assert emb.dim == 64 and emb is get_embedder("pixels:8x8")
    vecs = encode_examples(emb, [Example(image=png(5)), Example(image=png(250), text="ignored")])
    assert vecs.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="has no image"):
        encode_examples(emb, [Example("text only")])
    with pytest.raises(TypeError, match="not text"):
        emb.encode(["a label"])


def test_pixel_knn_on_digits_is_accurate(digits):
    """1-NN, class mean and the ECL on raw pixels, 10 examples per class, all the rest as test."""
    from iclcls.classifier import ICLClassifier

    pool, test = split(digits, 10)
    acc = {}
    for name, spec in (("one_nn", {"name": "knn_vote", "neighbors": 1}), ("class_mean", "class_mean"), ("ecl", "ecl")):
        clf = ICLClassifier(embedder="pixels", shortlist=spec, rank="retriever", select=None, shots=0, show_progress=False)
        clf.fit(pool, tune="none")
        acc[name] = np.mean([p == e.label for p, e in zip(clf.predict_labels(test), test)])
    assert acc["one_nn"] > 0.85, acc
    assert acc["class_mean"] > 0.8 and acc["ecl"] > 0.8, acc


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIP with tiny random weights and a 74-token character vocabulary, saved as an HF folder."""
    from iclcls.lm.tiny import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_embedder_embeds_text_images_and_both(tiny_clip, digits):
    emb = get_embedder(f"clip:{tiny_clip}")
    assert emb.name.startswith("clip:") and emb.dim == 16
    img, txt = digits[0].images[0], "a handwritten zero"
    vecs = encode_examples(emb, [Example(image=img), Example(text=txt), Example(text=txt, image=img)])
    assert vecs.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    both = vecs[0] + vecs[1]
    np.testing.assert_allclose(vecs[2], both / np.linalg.norm(both), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(emb.encode([txt])[0], vecs[1], rtol=1e-4, atol=1e-6)

    # the pool and a retriever classifier run unchanged on CLIP image vectors
    from iclcls.classifier import ICLClassifier

    pool, test = split(digits[:300], 3)
    clf = ICLClassifier(embedder=emb, shortlist="knn_vote", rank="retriever", select=None, shots=0, show_progress=False)
    clf.fit(pool)
    assert set(clf.predict_labels(test[:20])) <= {str(d) for d in range(10)}


# -- prompt and rank with images ------------------------------------------------------
IMAGE_TOKENS = 16  # the tiny VLM: 16x16 images, 4x4 patches, CLS dropped


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A LLaVA with tiny random weights (CLIP vision tower, Llama text model) and SmolLM2's
    tokenizer plus an <image> token, built from configs and saved as an HF folder."""
    from iclcls.lm.tiny import LLAVA_IMAGE_TOKENS, tiny_llava

    assert LLAVA_IMAGE_TOKENS == IMAGE_TOKENS
    return tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def vlm(tiny_vlm):
    from iclcls.lm import get_lm

    return get_lm(f"hf:{tiny_vlm}")


def test_prompt_messages_interleave_image_demonstrations_with_labels(digits):
    from iclcls.prompt import PromptBuilder

    b = PromptBuilder()
    msgs = b.messages(Example(image=digits[2].images[0]), digits[:2], ["0", "1", "2"])
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    kinds = [p["type"] if p["type"] == "image_url" else p["text"].strip() for p in msgs[0]["content"]]
    assert kinds[1:] == ["image_url", "Label: 0", "image_url", "Label: 1", "image_url", "Label:"]
    assert "Possible labels: 0, 1, 2" in kinds[0]
    url = msgs[0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    import base64

    assert base64.b64decode(url.split(",", 1)[1]) == digits[0].images[0]


def test_the_image_reaches_the_vlm(vlm, digits):
    from iclcls.lm.hf_vision import TransformersVLM

    assert isinstance(vlm, TransformersVLM)
    b_img = [{"type": "image", "image": digits[0].images[0]}, {"type": "image", "image": digits[1].images[0]}]
    text = [{"type": "text", "text": "Which digit?"}]
    with_images = [{"role": "user", "content": text + b_img}]
    without = [{"role": "user", "content": text}]
    # each <image> placeholder becomes the vision tower's tokens: prompt length says they are in
    assert vlm.count_chat_tokens(with_images) - vlm.count_chat_tokens(without) == 2 * IMAGE_TOKENS
    a, b = vlm.score_chat([[{"role": "user", "content": text + b_img[:1]}],
                           [{"role": "user", "content": text + b_img[1:]}]], ["3"])
    assert not np.allclose(a[0], b[0])  # a different image gives a different answer distribution


def test_constrained_chat_answers_are_always_labels(vlm, digits):
    labels = ["zero", "one", "two", "three", "10"]
    convs = [[{"role": "user", "content": [{"type": "image", "image": e.images[0]}, {"type": "text", "text": "Label:"}]}]
             for e in digits[:6]]
    answers = vlm.chat(convs, choices=labels)
    assert len(answers) == 6 and set(answers) <= set(labels)
    free = vlm.chat(convs[:1], max_tokens=3)  # unconstrained generation runs too (random weights: any text)
    assert isinstance(free[0], str)


def test_classifier_ranks_image_queries_through_the_vlm_chat(vlm, digits):
    from iclcls.classifier import ICLClassifier

    pool, test = split(digits, 2)
    clf = ICLClassifier(lm=vlm, embedder="pixels", shortlist="knn_vote", shortlist_k=4, select="knn", shots=3,
                        rank="likelihood", show_progress=False)
    clf.fit(pool, tune="none")
    preds = clf.predict_detailed(test[:4])
    for p in preds:  # ranked by each candidate's log-likelihood as the reply, images in the prompt
        assert p.trace["rank"] == "chat" and p.trace["chat_scored"]
        assert sorted(p.labels) == sorted(p.candidates) and list(p.scores) == sorted(p.scores, reverse=True)
        assert p.trace["chat_prompt_tokens"] > (p.trace["chat_demonstrations"] + 1) * IMAGE_TOKENS
    # constrained generation (chat with choices) gives the top label of that ranking
    clf.set_params(rank={"name": "chat", "scored": False})
    clf.fit(pool, tune="none")
    again = clf.predict_detailed(test[:4])
    for p, q in zip(again, preds):
        assert p.trace["chat_constrained"] and not p.trace["chat_scored"]
        assert p.label == q.label and p.trace["chat_answer"] == p.label


def test_batched_chat_puts_several_query_images_in_one_call(digits):
    """Control flow of ManyICL's query batching (a scripted LM: parsing, mapping, fallback)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from scripted_lm import ScriptedLM

    from iclcls.classifier import ICLClassifier

    pool, test = split(digits, 2)
    lm = ScriptedLM(answers=[" 3\n2: `5`.\n3: a cat"])
    clf = ICLClassifier(lm=lm, embedder="pixels", shortlist="all", select="fixed", shots=2, show_progress=False,
                        rank={"name": "batched_chat", "queries_per_call": 3, "retries": 0})
    clf.fit(pool, tune="none")
    preds = clf.predict_detailed(test[:3])
    assert len(lm.prompts) == 1  # one call for three queries
    assert lm.prompts[0].count("data:image/png;base64,") == 2 + 3  # the demonstrations once, then each query
    assert [p.label for p in preds[:1]] == ["3"] and preds[1].label == "5"
    assert preds[2].trace.get("batch_fallback") and preds[2].label == preds[2].candidates[0]


def test_batched_chat_through_the_vlm(vlm, digits):
    from iclcls.classifier import ICLClassifier

    pool, test = split(digits, 2)
    clf = ICLClassifier(lm=vlm, embedder="pixels", shortlist="knn_vote", shortlist_k=3, select="fixed", shots=2,
                        show_progress=False, rank={"name": "batched_chat", "queries_per_call": 2, "retries": 0})
    clf.fit(pool, tune="none")
    preds = clf.predict_detailed(test[:4])
    assert all(p.label in {str(d) for d in range(10)} and p.trace["attempts"] == 1 for p in preds)
