"""A word-level tokenizer over the shapes domain (`accel.zoo.shapes`), for the reference pipelines of issue 12.

No pretrained tokenizer can be downloaded here, and the domain has a few dozen words, so each word is one token.
It is built offline with `tokenizers` and wrapped as a transformers fast tokenizer, so the diffusers pipelines
call it (padding, truncation, attention masks, `save_pretrained`/`from_pretrained`) as they call CLIP's or T5's.
Ids follow T5's convention (pad 0, eos 1, unk 2) plus a bos for CLIP-style encoders; CLIP text models read
their pooled output at the first eos, so their config takes ``eos_token_id=EOS_ID`` (not 2, which selects the
legacy arg-max rule).
"""

from __future__ import annotations

from accel.zoo import shapes

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
FILLER_WORDS = ("a", "on", "background", "moving")


def domain_vocabulary() -> list[str]:
    """Every token, in id order: the specials, then the prompt template's words, then the domain's names."""
    words = [*FILLER_WORDS, *shapes.COLOURS, *shapes.SHAPES, *shapes.BACKGROUNDS, *shapes.MOTIONS]
    return [PAD, EOS, UNK, BOS, *dict.fromkeys(words)]


def domain_tokenizer(max_length: int, *, bos: bool = False):
    """A `PreTrainedTokenizerFast` over `domain_vocabulary()`: lower-cased, split on whitespace and punctuation,
    out-of-domain words -> unk, eos appended (and bos prepended when `bos`, as CLIP does); `max_length` is its
    `model_max_length`, what the pipelines pad to."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(domain_vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{BOS} $A {EOS}" if bos else f"$A {EOS}"
    special = [(EOS, EOS_ID), (BOS, BOS_ID)] if bos else [(EOS, EOS_ID)]
    core.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        padding_side="right",
    )
