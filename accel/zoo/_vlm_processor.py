"""The processor of `ref-vlm`: a real `Qwen2VLProcessor` over a word-level tokenizer built offline.

* Tokenizer: `tokenizers` WordLevel over the question words of `accel.zoo.scenes_multi` (lower-cased, split on
  whitespace and punctuation), with Qwen2-VL's special tokens as added tokens, wrapped as a transformers
  `PreTrainedTokenizerFast`; the chat template lays a prompt out as Qwen2-VL's does.
* Image processor: `Qwen2VLImageProcessorPil` (transformers' Qwen2-VL image processor without torchvision) with
  `ref-vlm`'s patch size, merge size and a pixel range that keeps 128x128 images at 128x128.
* Video processor: transformers' `Qwen2VLVideoProcessor` needs torchvision, which this project does not depend
  on. Where torchvision is missing, `VideoPatches` stands in: a `VideoProcessorMixin` with the same settings that
  rescales, normalises and lays patches out as `Qwen2VLVideoProcessor.patchify` does (videos must already be at
  a size the model takes; no resizing). The saved folder describes the real class, which loads where torchvision
  is installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from accel.zoo import scenes_multi
from accel.zoo._base import UnsupportedInputError

PAD, UNK = "<pad>", "<unk>"
SPECIALS = (
    PAD,
    UNK,
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ROLES = ("user", "assistant")
PATCH, MERGE, TEMPORAL = 8, 1, 2
MIN_PIXELS, MAX_PIXELS = 64 * 64, scenes_multi.SIZE * scenes_multi.SIZE
MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's (CLIP's) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL's layout, one word-level token per word: the newlines the real template writes are dropped by the
# whitespace pre-tokenizer anyway.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ ' ' + item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Every token in id order: Qwen2-VL's specials, the chat roles, then the words of the questions and answers."""
    return [*SPECIALS, *ROLES, *scenes_multi.words()]


def token_id(token: str) -> int:
    return vocabulary().index(token)


def tokenizer():
    """A `PreTrainedTokenizerFast` over `vocabulary()`; out-of-vocabulary words map to `<unk>`."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token="<|im_end|>",
        model_max_length=4096,
        padding_side="left",  # as generation pads
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _settings() -> dict:
    return dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        image_mean=list(MEAN),
        image_std=list(STD),
    )


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**_settings())


def video_processor():
    """transformers' `Qwen2VLVideoProcessor` where torchvision is installed, else `VideoPatches`."""
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(**_settings(), do_sample_frames=False, cap_pixels_per_frame=False)
    except ImportError:
        return _video_patches_class()(**_settings())


def processor():
    """`Qwen2VLProcessor` with `ref-vlm`'s tokenizer, image and video processors and chat template."""
    from transformers import Qwen2VLProcessor

    parts = dict(image_processor=image_processor(), tokenizer=tokenizer(), video_processor=video_processor())
    if type(parts["video_processor"]).__name__ == "Qwen2VLVideoProcessor":
        return Qwen2VLProcessor(**parts, chat_template=CHAT_TEMPLATE)
    return _processor_class()(**parts, chat_template=CHAT_TEMPLATE)


@functools.cache
def _processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    class Processor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` whose constructor accepts `VideoPatches`: without torchvision transformers cannot
        look up the video processor base class it checks against (everything else is Qwen2VLProcessor's)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
                return VideoProcessorMixin
            return super().check_argument_for_proper_class(argument_name, argument)

    Processor.__name__ = Processor.__qualname__ = "Qwen2VLProcessor"  # what save_pretrained records
    return Processor


def load_processor(folder: str | Path):
    """The processor saved in `folder`: `AutoProcessor` where torchvision is installed, else the same parts read
    from the folder one by one (the video processor as `VideoPatches`)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return _processor_class()(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True),
            tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True),
            video_processor=_video_patches_class().from_pretrained(folder, local_files_only=True),
            chat_template=(Path(folder) / "chat_template.jinja").read_text(),
        )
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def patchify(frames: torch.Tensor, patch: int = PATCH, merge: int = MERGE, temporal: int = TEMPORAL) -> torch.Tensor:
    """[F, C, H, W] normalised frames -> [F/temporal * H/patch * W/patch, C*temporal*patch*patch] rows in
    Qwen2-VL's order (merge windows row-major, then the patches of a window; channel, time, y, x within a row).
    A frame count that is not a multiple of `temporal` is padded with the last frame, as transformers does."""
    if pad := -frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    f, c, h, w = frames.shape
    if h % (patch * merge) or w % (patch * merge):
        raise UnsupportedInputError(
            f"a {h}x{w} frame is not a multiple of {patch * merge} pixels on each side; resize it first"
        )
    grid = frames.reshape(
        f // temporal, temporal, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch
    )
    grid = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return grid.reshape(-1, c * temporal * patch * patch)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 255] float) channel-first pixels -> the processor's normalised float32 values."""
    x = pixels.float() / 255.0
    shape = (3, 1, 1)
    return (x - torch.tensor(MEAN).view(shape)) / torch.tensor(STD).view(shape)


@functools.cache
def _video_patches_class():
    from transformers.image_processing_utils import BatchFeature
    from transformers.video_processing_utils import VideoProcessorMixin

    class VideoPatches(VideoProcessorMixin):
        """Qwen2-VL's video layout without torchvision (see the module docstring). Takes a video or a list of
        videos, each a `[frames, 3, H, W]` uint8 tensor (or a list of `[3, H, W]` frames)."""

        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(self, **kwargs):
            self.patch_size = kwargs.pop("patch_size", PATCH)
            self.merge_size = kwargs.pop("merge_size", MERGE)
            self.temporal_patch_size = kwargs.pop("temporal_patch_size", TEMPORAL)
            super().__init__(**kwargs)

        def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
            if isinstance(videos, torch.Tensor) and videos.ndim == 4:
                videos = [videos]
            rows, grids = [], []
            for video in videos:
                video = torch.stack(list(video)) if isinstance(video, (list, tuple)) else torch.as_tensor(video)
                frames = torch.stack([normalise(frame) for frame in video])
                rows.append(patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size))
                t = -(-video.shape[0] // self.temporal_patch_size)
                grids.append([t, video.shape[-2] // self.patch_size, video.shape[-1] // self.patch_size])
            data = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}
            return BatchFeature(data=data, tensor_type=return_tensors)

        def to_dict(self) -> dict:
            """Saved as the real class with the same settings, so that it loads where torchvision is installed."""
            out = super().to_dict()
            out.update(video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False, cap_pixels_per_frame=False)
            out.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_resize=True, resample=3)
            return out

    return VideoPatches
