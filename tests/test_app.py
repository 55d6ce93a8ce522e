"""The web app (accel.app) through its `compare` API endpoint, with gradio_client against the app launched on
127.0.0.1 in this module (closed at its end; every call waits at most CALL_TIMEOUT seconds)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
client_lib = pytest.importorskip("gradio_client")

import accel  # noqa: E402
from accel.app import Limits, build_app  # noqa: E402
from accel.app.ui import launch  # noqa: E402

CALL_TIMEOUT = 120
LIMITS = Limits(max_steps=20, max_size=128, max_frames=9, max_prompt_chars=100, max_upload_mb=1)
FLUX = "tiny-random-flux"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    demo = build_app(max_models=3, device="cpu", limits=LIMITS)
    launch(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    return client_lib.Client(app.local_url, verbose=False)


def compare(client, model: str, settings: dict, prompt: str = "", image=None, video=None):
    """(baseline path, accelerated path, metrics) of one `compare` call."""
    job = client.submit(model, prompt, settings, image, video, api_name="/compare")
    return job.result(timeout=CALL_TIMEOUT)


def refused(client, model: str, settings: dict, **kwargs) -> str:
    with pytest.raises(client_lib.exceptions.AppError) as err:
        compare(client, model, settings, **kwargs)
    return str(err.value)


def test_image_comparison(app, client):
    baseline, accelerated, metrics = compare(client, FLUX, {"preset": "fast", "steps": 6, "seed": 1})
    assert Path(baseline).suffix == Path(accelerated).suffix == ".png"
    assert metrics["model"] == FLUX and metrics["kind"] == "image" and metrics["settings"] == "fast"
    base, acc = metrics["baseline"], metrics["accelerated"]
    assert base["passes_computed"] == 12 and base["passes_reused"] == 0  # 6 steps, true CFG: 2 passes each
    assert acc["passes_computed"] + acc["passes_reused"] == 12 and acc["passes_reused"] > 0
    assert base["seconds"] > 0 and acc["seconds"] > 0 and metrics["speedup"] > 0
    assert base["peak_memory_mb"] > 0
    assert 0 < metrics["psnr"] < 100 and 0 < metrics["ssim"] <= 1
    assert metrics["applied"] and metrics["applied"][0].startswith("cache:")
    assert metrics["report"]["stats"]["cache"]["calls"][-1]["reused"] == acc["passes_reused"]
    assert accel.get_handle(app.accel.service.pool.peek(FLUX).target) is None  # unpatched after the request


def test_lossless_is_identical(client):
    baseline, accelerated, metrics = compare(client, FLUX, {"preset": "lossless", "steps": 4})
    assert metrics["psnr"] == "inf" and metrics["ssim"] == 1.0
    assert Path(baseline).read_bytes() == Path(accelerated).read_bytes()
    assert metrics["accelerated"]["passes_reused"] == 0 and not metrics["applied"]


def test_video_comparison(client):
    import av

    settings = {"cache": "threshold", "cache_value": 3.0, "steps": 6, "frames": 5}  # a threshold that reuses
    baseline, accelerated, metrics = compare(client, "tiny-random-wan", settings)
    for path in (baseline, accelerated):
        with av.open(path) as video:
            frames = list(video.decode(video=0))
        assert Path(path).suffix == ".mp4" and len(frames) == 5 and frames[0].width == 64
    assert metrics["kind"] == "video" and metrics["baseline"]["passes_computed"] == 12  # CFG: 2 passes a step
    assert isinstance(metrics["psnr"], float) and metrics["accelerated"]["passes_reused"] > 0


def test_vlm_comparison(client):
    settings = {"prune": True, "prune_keep": 4, "new_tokens": 6}
    baseline, accelerated, metrics = compare(client, "tiny-random-llava", settings)
    answers = [Path(p).read_text().strip() for p in (baseline, accelerated)]
    assert all(a.startswith("token ids: ") and len(a.split()) == 2 + 6 for a in answers)
    assert [metrics[k]["answer"] for k in ("baseline", "accelerated")] == answers
    assert 0 <= metrics["token_agreement"] <= 1 and metrics["psnr"] is None
    assert metrics["accelerated"]["visual_tokens_kept"] == "4/16"  # LLaVA's 56 px image: 16 tokens
    assert metrics["baseline"]["passes_computed"] is None


def test_same_request_twice(client):
    settings = {"preset": "balanced", "steps": 5, "seed": 7}
    first, second = compare(client, FLUX, settings), compare(client, FLUX, settings)
    for a, b in zip(first[:2], second[:2]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert first[2]["psnr"] == second[2]["psnr"] and not first[2]["baseline"]["cached"]
    assert second[2]["baseline"]["cached"]  # only the accelerated side ran again


def test_two_clients_at_once(app):
    requests = [
        (FLUX, {"preset": "fast", "steps": 5, "seed": 11}),
        (FLUX, {"preset": "balanced", "cache": "threshold", "cache_value": 0.2, "steps": 5, "seed": 11}),
    ]
    clients = [client_lib.Client(app.local_url, verbose=False) for _ in requests]
    together: list = [None] * len(requests)

    def run(i):
        together[i] = compare(clients[i], *requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
    one_by_one = [compare(clients[0], *r) for r in requests]
    for (base_a, acc_a, m_a), (base_b, acc_b, m_b) in zip(together, one_by_one):
        assert Path(base_a).read_bytes() == Path(base_b).read_bytes()
        assert Path(acc_a).read_bytes() == Path(acc_b).read_bytes()
        assert (
            m_a["psnr"] == m_b["psnr"]
            and m_a["accelerated"]["passes_computed"] == m_b["accelerated"]["passes_computed"]
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 500}, "steps must be between 1 and 20, got 500"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"size": 100}, "size must be a multiple of 8 between 32 and 128 pixels, got 100"),
        ({"size": 1024}, "size must be a multiple of 8 between 32 and 128 pixels, got 1024"),
        ({"seed": -1}, "seed must be between 0 and 2**32 - 1, got -1"),
        ({"preset": "fastest"}, "unknown preset 'fastest'; choose one of: lossless, balanced, fast"),
        ({"turbo": True}, "unknown settings ['turbo']"),
        ({"cache": "target", "cache_value": -1}, "CacheConfig.target=-1.0"),
        ({"prune": True}, "visual token pruning applies to vision-language models, not to FLUX"),
    ],
)
def test_out_of_bounds_settings(client, settings, message):
    assert message in refused(client, FLUX, settings)


def test_out_of_bounds_inputs(client, tmp_path):
    assert "frames must be between 1 and 9, got 10" in refused(client, "tiny-random-wan", {"frames": 10})
    assert "new tokens must be between 1 and 64, got 65" in refused(client, "tiny-random-llava", {"new_tokens": 65})
    long = "a red circle " * 10
    assert f"the prompt has {len(long)} characters; the limit is 100" in refused(client, FLUX, {}, prompt=long)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    image = client_lib.handle_file(str(text))
    assert "the upload 'notes.txt' is not an image" in refused(client, "tiny-random-llava", {}, image=image)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    assert "the upload 'fake.png' is not an image Pillow can read" in refused(
        client, "tiny-random-llava", {}, image=client_lib.handle_file(str(fake))
    )
    big = tmp_path / "big.png"
    big.write_bytes(bytes(int(1.5 * 2**20)))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):  # launch's limit
        compare(client, "tiny-random-llava", {}, image=client_lib.handle_file(str(big)))
    assert "takes no upload" in refused(client, FLUX, {}, image=client_lib.handle_file(str(fake)))


def test_unknown_and_unreachable_models(client, monkeypatch):
    import huggingface_hub

    assert "is neither a folder on this machine nor a Hugging Face Hub id" in refused(client, "no such model!", {})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the Hub out of reach
    message = refused(client, "someone/some-model", {})
    assert "cannot reach the Hugging Face Hub to load 'someone/some-model'" in message and "local folder" in message


def test_local_folder(client):
    from accel.zoo.reference import path

    folder = str(path("ref-flux"))
    baseline, accelerated, metrics = compare(client, folder, {"preset": "lossless", "steps": 2, "size": 32})
    assert metrics["model"] == folder and metrics["kind"] == "image" and metrics["psnr"] == "inf"
    assert metrics["baseline"]["passes_computed"] == 2  # diffusers' FluxPipeline default: no true CFG


def test_reference_vlm(client):
    """ref-vlm (trained weights when shipped, else random ones) with its processor; without an upload it is asked
    about a scene drawn from the seed."""
    settings = {"prune": True, "prune_keep": 64, "new_tokens": 3, "seed": 2}
    baseline, accelerated, metrics = compare(client, "ref-vlm", settings, prompt="how many shapes are there ?")
    assert metrics["accelerated"]["visual_tokens_kept"] == "64/256"  # a 128 px scene: 256 visual tokens
    assert [Path(p).read_text().strip() for p in (baseline, accelerated)] == [
        metrics[side]["answer"].strip() for side in ("baseline", "accelerated")
    ]
    assert metrics["baseline"]["tokens"] and not metrics["baseline"]["answer"].startswith("token ids")


def _llava_folder(folder: Path) -> str:
    """The tiny LLaVA of the zoo saved with a processor (word-level tokenizer over its 256 ids, CLIP image
    processor at its 56 px), so that AutoProcessor + AutoModelForImageTextToText load it as a real VLM."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from accel import zoo
    from accel.zoo._vlm_inputs import IMAGE_TOKEN_ID, VOCAB_SIZE

    words = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB_SIZE))]
    words[IMAGE_TOKEN_ID] = "<image>"
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="w3")
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # so that 16 "<image>" in a row split
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=template,
    )
    zoo.build("llava").obj.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_local_vlm_folder_with_an_image(client, tmp_path):
    from PIL import Image

    folder = _llava_folder(tmp_path / "llava")
    picture = tmp_path / "red.png"
    Image.new("RGB", (80, 60), "red").save(picture)
    settings = {"prune": True, "prune_keep": 4, "new_tokens": 5}
    baseline, accelerated, metrics = compare(
        client, folder, settings, prompt="w5 w6 w7", image=client_lib.handle_file(str(picture))
    )
    answer = Path(baseline).read_text().split()
    assert len(answer) == 5 and all(word.startswith("w") for word in answer)  # decoded by the tokenizer
    assert metrics["accelerated"]["visual_tokens_kept"] == "4/16" and 0 <= metrics["token_agreement"] <= 1
