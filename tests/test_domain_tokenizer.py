"""The shapes domain's word-level tokenizer, alone and inside the real FluxPipeline and WanPipeline prompt
encoders (tiny CLIP, T5 and UMT5 text models with random weights)."""

import itertools

import pytest
import torch
from transformers import AutoTokenizer

from accel.zoo import shapes
from accel.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, domain_tokenizer, domain_vocabulary


def _every_prompt() -> list[str]:
    scenes = itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.BACKGROUNDS, (None, *shapes.MOTIONS))
    return [shapes.prompt(shapes.Scene(c, s, b, False, 0.5, 0.5, 0.4, m)) for c, s, b, m in scenes]


def test_every_domain_prompt_is_known_words_and_decodes_back():
    tokenizer = domain_tokenizer(16)
    prompts = _every_prompt()
    assert len(prompts) == 7 * 5 * 4 * 5
    ids = tokenizer(prompts).input_ids
    assert all(UNK_ID not in row and row[-1] == EOS_ID for row in ids)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == prompts
    assert len(set(domain_vocabulary())) == len(domain_vocabulary())


def test_out_of_domain_words_are_unknown_and_case_is_ignored():
    tokenizer = domain_tokenizer(16)
    assert tokenizer("A RED Circle").input_ids == tokenizer("a red circle").input_ids
    ids = tokenizer("a purple hexagon!").input_ids
    assert ids[0] != UNK_ID and ids[1:4] == [UNK_ID] * 3 and ids[-1] == EOS_ID


def test_clip_style_padding_truncation_and_mask():
    tokenizer = domain_tokenizer(8, bos=True)
    batch = tokenizer(
        ["a red circle", "a red circle on a navy background moving left"],
        padding="max_length",
        max_length=8,
        truncation=True,
        return_tensors="pt",
    )
    short, long = batch.input_ids.tolist()
    assert short[:5] == [BOS_ID, *tokenizer("a red circle", add_special_tokens=False).input_ids, EOS_ID]
    assert short[5:] == [PAD_ID] * 3 and batch.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    assert long[0] == BOS_ID and long[-1] == EOS_ID and batch.attention_mask[1].all()  # truncated, eos kept


def test_save_and_reload_as_the_pipelines_do(tmp_path):
    tokenizer = domain_tokenizer(12, bos=True)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    prompts = _every_prompt()[::37]
    kwargs = dict(padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert again.model_max_length == 12
    assert torch.equal(again(prompts, **kwargs).input_ids, tokenizer(prompts, **kwargs).input_ids)


def _tiny_clip_and_t5(max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(domain_vocabulary())
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=PAD_ID)
    ).eval()
    return clip, t5


def test_flux_encode_prompt_reads_the_domain_tokenizers():
    from diffusers import FluxPipeline

    clip, t5 = _tiny_clip_and_t5(16)
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=clip,
        tokenizer=domain_tokenizer(16, bos=True),
        text_encoder_2=t5,
        tokenizer_2=domain_tokenizer(24),
        transformer=None,
    )
    prompts = ["a red circle on a navy background", "a blue square on a beige background"]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device("cpu"), max_sequence_length=24)
        tokens = pipe.tokenizer(prompts[0], padding="max_length", max_length=16, return_tensors="pt").input_ids
        hidden = clip(tokens).last_hidden_state
    assert embeds.shape == (2, 24, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[1])
    eos = tokens[0].tolist().index(EOS_ID)  # CLIP pools at the first eos, which the config names
    torch.testing.assert_close(pooled[0], hidden[0, eos])


def test_wan_encode_prompt_reads_the_domain_tokenizer():
    from diffusers import WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(domain_vocabulary()),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            pad_token_id=PAD_ID,
        )
    ).eval()
    pipe = WanPipeline(tokenizer=domain_tokenizer(32), text_encoder=umt5, vae=None, scheduler=None, transformer=None)
    prompt = "a green ring on a black background moving up"
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, max_sequence_length=32, device=torch.device("cpu")
        )
    words = len(prompt.split()) + 1  # and eos
    assert embeds.shape == (1, 32, 32)
    assert embeds[0, :words].abs().sum(-1).gt(0).all() and embeds[0, words:].eq(0).all()


@pytest.mark.parametrize("bos", [False, True])
def test_vocabulary_ids_are_the_declared_specials(bos):
    vocab = domain_tokenizer(8, bos=bos).get_vocab()
    assert [vocab[t] for t in ("<pad>", "</s>", "<unk>", "<s>")] == [PAD_ID, EOS_ID, UNK_ID, BOS_ID]
