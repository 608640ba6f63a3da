"""Tiny random-weight multimodal models built from configs, as the transformers test suite
does: they download nothing, so the image paths can be exercised (tests, benchmarks, a
smoke test of an install) where no real CLIP or VLM can be fetched. Their answers are
noise; what they prove is that images travel through the code and reach the model.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# A LLaVA chat template that places each image part's <image> placeholder where it stands.
LLAVA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}"
    "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_IMAGE_TOKENS = 16  # 16x16 images in 4x4 patches, the CLS token dropped


def tiny_llava(directory: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Save a LLaVA (CLIP vision tower, 2-layer Llama text model, hidden size 32) with SmolLM2's
    tokenizer plus an ``<image>`` token to ``directory``; return it."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if tokenizer_dir is None:
        from iclcls.lm.convert import hf_dir_for

        tokenizer_dir = hf_dir_for("smollm2")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=16, patch_size=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, tie_word_embeddings=True),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


def tiny_clip(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a CLIP (2-layer towers, hidden size 32, 16-d projection, a 74-token character
    vocabulary) to ``directory``, loadable by sentence-transformers; return it."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(string.ascii_lowercase + string.digits)
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(cfg).save_pretrained(d)
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d
