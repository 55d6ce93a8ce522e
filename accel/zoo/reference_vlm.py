"""`ref-vlm` (issue 13): a small `Qwen2VLForConditionalGeneration` trained here on the multi-shape scenes of
`accel.zoo.scenes_multi`, so that visual token pruning is judged on a model whose answers depend on the image.

The real transformers class with a small config, and its real processor (`accel.zoo._vlm_processor`: word-level
tokenizer with Qwen2-VL's special tokens and chat template, Qwen2-VL image and video processors):

* 128x128 images in 8x8 patches, merge size 1: 16x16 = 256 visual tokens per image, each one LM token, and
  4-frame videos (2 temporal patches) = 512 tokens; budgets of 64/128 tokens are a real choice.
  (Qwen2-VL's 14-pixel patches merged 2x2 would need 448x448 images and a ViT over 1024 patches for the same
  256 tokens, four times the vision cost on a CPU.)
* ViT: 4 blocks of width 64 (cheap at 256 patches: 4 instead of 2 blocks cost no measurable step time and
  answered 44% of the training questions at step 400 instead of 35%); language model: 3 layers of width 128,
  4 heads of 32 (2 KV heads). 0.77M parameters, 1.5 MB in float16. M-RoPE sections
  (2, 7, 7) with rope_theta 20: in a 32-wide head the height and width bands get 7 frequencies each that turn
  visibly over 16 rows/columns (at Qwen2-VL's theta 1e6 the width band would hardly turn at all), which is how
  the language model tells left from right.
* Weights shipped in float16 (`save_pretrained` layout) under `accel/zoo/weights/ref-vlm`; trained by
  `python -m accel.zoo.train_vlm`.

    model, processor = accel.zoo.load("ref-vlm")
    print(predict(model, processor, scenes_multi.held_out(4, 0)))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from accel.zoo import _vlm_processor as vp
from accel.zoo import scenes_multi
from accel.zoo._base import UnknownModelError, seeded

NAME = "ref-vlm"
WEIGHTS = Path(__file__).parent / "weights" / NAME
VISION = dict(depth=4, embed_dim=64, num_heads=2, mlp_ratio=2)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
ROPE = {"rope_type": "default", "rope_theta": 20.0, "mrope_section": [2, 7, 7]}
IMAGE_TOKENS = (scenes_multi.SIZE // vp.PATCH // vp.MERGE) ** 2  # 256 visual tokens per image
VIDEO_FRAMES = scenes_multi.FRAMES // vp.TEMPORAL  # temporal patches per video
VIDEO_TOKENS = IMAGE_TOKENS * VIDEO_FRAMES  # 512


def config():
    """The `Qwen2VLConfig` of `ref-vlm`."""
    from transformers import Qwen2VLConfig

    ids = {token: vp.token_id(token) for token in vp.SPECIALS}
    vision = dict(
        **VISION,
        hidden_size=TEXT["hidden_size"],  # the merger's output width
        in_channels=3,
        patch_size=vp.PATCH,
        spatial_merge_size=vp.MERGE,
        temporal_patch_size=vp.TEMPORAL,
    )
    text = dict(
        **TEXT,
        vocab_size=len(vp.vocabulary()),
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=ids[vp.PAD],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
        rope_parameters=dict(ROPE),
    )
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _generation(model) -> None:
    gen = model.generation_config
    gen.eos_token_id = model.config.text_config.eos_token_id
    gen.pad_token_id = model.config.text_config.pad_token_id
    gen.bos_token_id = None
    gen.do_sample = False
    gen.max_new_tokens = 2  # one word, then <|im_end|>
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)


def untrained(seed: int = 0, dtype: torch.dtype = torch.float32):
    """`(model, processor)`: `ref-vlm`'s architecture with seeded random weights (what the trainer starts from,
    and what tests and CI run before the weights exist)."""
    from transformers import Qwen2VLForConditionalGeneration

    model = seeded(seed, lambda: Qwen2VLForConditionalGeneration(config()))
    model.config._attn_implementation = "sdpa"
    _generation(model)
    return model.to(dtype).eval(), vp.processor()


def save(model, processor, out: str | Path) -> Path:
    """Model (float16) and processor in the `save_pretrained` layout; the model is left as it was."""
    out = Path(out)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    model.to("cpu", torch.float16).save_pretrained(str(out), safe_serialization=True)
    model.to(device, dtype)
    processor.save_pretrained(str(out))
    return out


def load(folder: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`(model, processor)` from `folder` (default: the shipped weights), offline, with `from_pretrained`."""
    from transformers import Qwen2VLForConditionalGeneration

    where = Path(folder) if folder is not None else WEIGHTS
    if not (where / "config.json").exists():
        raise UnknownModelError(f"no weights for {NAME!r} at {where}; train them with `python -m accel.zoo.train_vlm`")
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(where), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    _generation(model)
    return model.to(device).eval(), vp.load_processor(where)


def prompt(processor, question: scenes_multi.Question) -> str:
    """The chat-template prompt of one question, up to where the answer starts."""
    media = {"type": "video" if question.video else "image"}
    messages = [{"role": "user", "content": [media, {"type": "text", "text": question.text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def inputs(processor, questions: Sequence[scenes_multi.Question]) -> dict:
    """The processor's model inputs for a batch of questions (left-padded; images and videos may mix)."""
    images = [scenes_multi.render(q.scene) for q in questions if not q.video]
    videos = [scenes_multi.render(q.scene) for q in questions if q.video]
    batch = processor(
        text=[prompt(processor, q) for q in questions],
        images=images or None,
        videos=videos or None,
        padding=True,
        return_tensors="pt",
    )
    return dict(batch)


@torch.no_grad()
def predict(model, processor, questions: Sequence[scenes_multi.Question], batch_size: int = 8) -> list[str]:
    """Greedy one-word answers: the most likely first token after each prompt (one prefill per batch, with a
    KV cache as generate() runs it)."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    out = []
    for start in range(0, len(questions), batch_size):
        batch = inputs(processor, questions[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, use_cache=True, logits_to_keep=1).logits[:, -1]
        out += tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


def accuracy(predictions: Sequence[str], questions: Sequence[scenes_multi.Question]) -> float:
    return sum(p == q.answer for p, q in zip(predictions, questions)) / max(len(questions), 1)
