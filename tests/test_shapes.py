"""The shapes domain (accel.zoo.shapes) and its prompt-following detector (accel.bench.prompt_score)."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from accel.bench import prompt_score
from accel.errors import AccelError
from accel.zoo import shapes
from accel.zoo._base import UnsupportedInputError


def _background(scene: shapes.Scene, size: int = 64) -> torch.Tensor:
    """The scene's background alone: its shape moved far off the image."""
    return shapes.render(dataclasses.replace(scene, cx=-5.0, size=0.1, motion=None), size)


def _centroid(frame: torch.Tensor, scene: shapes.Scene) -> torch.Tensor:
    """(x, y) centre of the pixels that differ from the scene's background, in pixels."""
    background = _background(scene, frame.shape[-1])
    mask = (frame - background).abs().sum(0) > 0.05
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


def _noisy(pixels: torch.Tensor, seed: int, std: float = 0.05) -> torch.Tensor:
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return (pixels + std * noise).clamp(0, 1)


# -- the generator ---------------------------------------------------------------------------------------------


def test_prompts_round_trip_through_parse_prompt():
    for scene in shapes.sample_scenes(30, seed=1) + shapes.sample_scenes(30, seed=2, video=True):
        text = shapes.prompt(scene)
        fields = {"colour": scene.colour, "shape": scene.shape, "background": scene.background}
        assert shapes.parse_prompt(text) == {**fields, "motion": scene.motion}
    assert shapes.prompt(shapes.Scene("red", "circle", "navy")) == "a red circle on a navy background"
    assert (
        shapes.prompt(shapes.Scene("cyan", "ring", "gray", motion="up")) == "a cyan ring on a gray background moving up"
    )


@pytest.mark.parametrize(
    "text, named",
    [
        ("a purple circle on a navy background", "purple"),
        ("a red hexagon on a navy background", "hexagon"),
        ("a red circle on a pink background", "pink"),
        ("a red circle on a navy background moving sideways", "sideways"),
        ("a photo of a cat", "cat"),
        ("", "''"),
    ],
)
def test_text_outside_the_domain_raises_a_clear_error(text, named):
    with pytest.raises(UnsupportedInputError) as caught:
        shapes.parse_prompt(text)
    message = str(caught.value)
    assert named in message and "magenta" in message and "triangle" in message and "beige" in message
    assert isinstance(caught.value, AccelError) and isinstance(caught.value, ValueError)


def test_sample_scenes_is_seeded_and_covers_the_vocabulary():
    assert shapes.sample_scenes(20, seed=3) == shapes.sample_scenes(20, seed=3)
    assert shapes.sample_scenes(20, seed=3) != shapes.sample_scenes(20, seed=4)
    scenes = shapes.sample_scenes(300, seed=0)
    assert {s.colour for s in scenes} == set(shapes.COLOURS)
    assert {s.shape for s in scenes} == set(shapes.SHAPES)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)
    assert {s.gradient for s in scenes} == {True, False} and all(s.motion is None for s in scenes)
    assert len({round(s.cx, 3) for s in scenes}) > 100 and len({round(s.size, 3) for s in scenes}) > 100
    clips = shapes.sample_scenes(100, seed=0, video=True)
    assert {s.motion for s in clips} == set(shapes.MOTIONS)


def test_renders_have_the_right_layout_and_range():
    scene = shapes.sample_scenes(1, seed=5)[0]
    image = shapes.render(scene, size=48)
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    clip = shapes.render(shapes.sample_scenes(1, seed=5, video=True)[0], size=32, frames=9)
    assert clip.shape == (9, 3, 32, 32) and float(clip.min()) >= 0 and float(clip.max()) <= 1
    assert torch.equal(shapes.render(scene, size=48), image)  # deterministic
    assert torch.equal(
        shapes.render_prompt(shapes.prompt(scene), seed=7), shapes.render_prompt(shapes.prompt(scene), seed=7)
    )


@pytest.mark.parametrize("video", [False, True])
def test_the_shape_stays_inside_the_frame(video):
    for scene in shapes.sample_scenes(60, seed=11, video=video):
        pixels = shapes.render(scene, size=32, frames=9 if video else None)
        frames = pixels if video else pixels[None]
        for frame in frames:
            background = _background(scene, 32)
            changed = (frame - background).abs().sum(0) > 1e-4
            assert changed.any(), scene
            edges = torch.cat([changed[0], changed[-1], changed[:, 0], changed[:, -1]])
            assert not edges.any(), f"{scene} touches the border"


@pytest.mark.parametrize("direction", shapes.MOTIONS)
def test_clip_motion_moves_the_centroid_in_the_stated_direction(direction):
    scene = shapes.scene_for(f"a green square on a black background moving {direction}", seed=2)
    clip = shapes.render(scene, size=64, frames=9)
    track = torch.stack([_centroid(frame, scene) for frame in clip])
    steps = track[1:] - track[:-1]
    dx, dy = shapes.DIRECTIONS[direction]
    along = steps @ torch.tensor([dx, dy])
    across = steps @ torch.tensor([dy, dx])
    assert (along > 1.5).all() and across.abs().max() < 0.2  # steady, and only along its axis
    assert float(along.sum()) == pytest.approx(shapes.TRAVEL * 64, abs=1.5)


def test_render_prompt_follows_the_text_and_rejects_clip_prompts_without_frames():
    text = "a yellow cross on a beige background"
    scene = shapes.scene_for(text, seed=4)
    assert (scene.colour, scene.shape, scene.background, scene.motion) == ("yellow", "cross", "beige", None)
    assert torch.equal(shapes.render_prompt(text, seed=4), shapes.render(scene))
    with pytest.raises(UnsupportedInputError, match="frames="):
        shapes.render_prompt(text + " moving left", seed=4)
    with pytest.raises(UnsupportedInputError, match="too small"):
        shapes.render(scene, size=4)
    with pytest.raises(UnsupportedInputError, match="fraction"):
        shapes.render(dataclasses.replace(scene, size=0.0))


def test_gradient_background_brightens_downwards_and_keeps_its_colour():
    image = _background(shapes.Scene("red", "circle", "navy", gradient=True), 32)
    assert float(image[2, -1].mean()) > float(image[2, 0].mean()) + 0.15
    assert float((image - image[:, :, :1]).abs().max()) == 0  # vertical: constant along each row
    means = image.mean(dim=(1, 2))
    assert prompt_score._nearest(means, shapes.BACKGROUNDS) == "navy"


def _blurred(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [3, H, W]: the soft edges a trained decoder gives."""
    taps = torch.exp(-torch.arange(-4.0, 5.0).pow(2) / (2 * sigma**2))
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)
    x = torch.nn.functional.pad(pixels[None], (4, 4, 4, 4), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(3, 1, 1, 9), groups=3)
    return torch.nn.functional.conv2d(x, taps.view(3, 1, 9, 1), groups=3)[0]


# -- the detector ----------------------------------------------------------------------------------------------


def _image_accuracy(size: int, noise: float, blur: float = 0.0) -> dict:
    scenes = shapes.sample_scenes(200, seed=123)
    images = [shapes.render(s, size) for s in scenes]
    if blur:
        images = [_blurred(image, blur) for image in images]
    if noise:
        images = [_noisy(image, seed=i, std=noise) for i, image in enumerate(images)]
    return prompt_score.score(images, [shapes.prompt(s) for s in scenes])


def _clip_accuracy(size: int, noise: float) -> dict:
    scenes = shapes.sample_scenes(50, seed=7, video=True)
    clips = [shapes.render(s, size, frames=9) for s in scenes]
    if noise:
        clips = [_noisy(clip, seed=i, std=noise) for i, clip in enumerate(clips)]
    return prompt_score.score(clips, [shapes.prompt(s) for s in scenes])


@pytest.mark.parametrize(
    "size, noise, colour_and_background, shape", [(64, 0.0, 0.99, 0.95), (64, 0.05, 0.90, 0.90), (32, 0.0, 0.95, 0.95)]
)
def test_detector_reads_ground_truth_images(size, noise, colour_and_background, shape):
    result = _image_accuracy(size, noise)
    assert result["n"] == 200 and result["motion"] is None
    assert result["colour"] >= colour_and_background and result["background"] >= colour_and_background
    assert result["shape"] >= shape


@pytest.mark.parametrize("size, noise, floor", [(64, 0.0, 0.95), (64, 0.05, 0.90), (32, 0.0, 0.95)])
def test_detector_reads_ground_truth_clips(size, noise, floor):
    result = _clip_accuracy(size, noise)
    assert result["n"] == 50
    for key in ("colour", "shape", "background", "motion"):
        assert result[key] >= floor, (key, result[key])


def test_detector_reads_blurred_images():
    result = _image_accuracy(64, noise=0.0, blur=1.5)
    assert result["colour"] >= 0.95 and result["background"] >= 0.95 and result["shape"] >= 0.9


def test_shuffled_prompts_score_low():
    scenes = shapes.sample_scenes(100, seed=9)
    images = torch.stack([shapes.render(s, 32) for s in scenes])  # a batch tensor [B, 3, H, W]
    prompts = [shapes.prompt(s) for s in scenes]
    shuffled = [prompts[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    right, wrong = prompt_score.score(images, prompts), prompt_score.score(images, shuffled)
    assert right["overall"] >= 0.95
    assert wrong["colour"] < 0.35 and wrong["shape"] < 0.4 and wrong["background"] < 0.45 and wrong["overall"] < 0.1


def test_clips_with_the_wrong_direction_or_no_motion_score_low():
    scenes = shapes.sample_scenes(12, seed=3, video=True)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    clips = [shapes.render(s, 32, frames=9) for s in scenes]
    flipped = [shapes.prompt(s).replace(s.motion, opposite[s.motion]) for s in scenes]
    assert prompt_score.score(clips, flipped)["motion"] == 0
    still = [clip[4:5].expand(9, -1, -1, -1) for clip in clips]  # the middle frame, held
    result = prompt_score.score(still, [shapes.prompt(s) for s in scenes])
    assert result["motion"] == 0 and all(row["detected"]["motion"] is None for row in result["samples"])
    assert result["colour"] == 1 and result["shape"] == 1


def test_detector_accepts_numpy_and_pil_and_names_the_layouts_otherwise():
    pixels = shapes.render_prompt("a magenta triangle on a gray background", seed=1)
    as_uint8 = (pixels.permute(1, 2, 0) * 255).round().byte().numpy()
    expected = {"colour": "magenta", "shape": "triangle", "background": "gray"}
    for image in (pixels, as_uint8, as_uint8.astype(np.float32) / 255, Image.fromarray(as_uint8)):
        found = prompt_score.detect(image)
        assert {k: found[k] for k in expected} == expected
    clip = shapes.render_prompt("a white ring on a navy background moving down", seed=1, frames=9)
    as_frames = [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in clip]
    assert prompt_score.detect_clip(as_frames)["motion"] == prompt_score.detect_clip(clip)["motion"] == "down"
    for bad in (pixels.permute(1, 2, 0), pixels[None], (pixels * 255).byte(), "image.png"):
        with pytest.raises(UnsupportedInputError, match=r"\[3, H, W\]"):
            prompt_score.detect(bad)


def test_score_rejects_mismatched_inputs():
    image = shapes.render_prompt("a red circle on a black background")
    with pytest.raises(UnsupportedInputError, match="one prompt per sample"):
        prompt_score.score([image, image], ["a red circle on a black background"])
    with pytest.raises(UnsupportedInputError, match="pass the clip"):
        prompt_score.score([image], ["a red circle on a black background moving up"])
    with pytest.raises(UnsupportedInputError, match="outside the shapes domain"):
        prompt_score.score([image], ["a red circle"])


def test_a_blank_image_has_no_foreground():
    blank = _background(shapes.Scene("red", "circle", "beige"))
    found = prompt_score.detect(blank)
    assert found["background"] == "beige" and found["colour"] is None and found["shape"] is None
