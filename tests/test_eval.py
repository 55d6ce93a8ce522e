"""`accel eval` / accel.bench.evaluate: per-budget patching, request answering and the table, on tiny LLaVA with a
real (tiny) LlavaProcessor and an in-memory task in lmms-eval's request format."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import tiny

import accel
from accel.bench import evaluate
from accel.bench.evaluate import HFAnswerer, answer_requests, evaluate_pruning
from accel.cli import main
from accel.zoo import vlm

IMAGE_TOKENS = 16  # tiny LLaVA: 56 px, patch 14


def tiny_processor():
    """A real LlavaProcessor whose word-level vocabulary matches the zoo's ids ("w5" -> 5, "<image>" -> 250)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": vlm.PAD_ID, "<s>": vlm.BOS_ID, "</s>": vlm.EOS_ID, "<image>": vlm.IMAGE_TOKEN_ID}
    vocab.update({f"w{i}": i for i in range(3, vlm.VOCAB_SIZE) if i not in vocab.values()})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)) for _ in range(n)]


DOCS = [{"image": im, "question": f"w{10 + i} w{20 + i} w{30 + i}"} for i, im in enumerate(images(3))]
TASK_DOCS = {"tiny_vqa": {"test": DOCS}}


def doc_to_visual(doc):
    return [doc["image"]]


def generate_args(until=()):
    gen = {"max_new_tokens": 4, "until": list(until)}
    return [(d["question"], dict(gen), doc_to_visual, i, "tiny_vqa", "test") for i, d in enumerate(DOCS)]


@pytest.fixture(scope="module")
def llava():
    return tiny("llava").obj, tiny_processor()


def test_answerer_generates_and_scores_continuations(llava):
    model, processor = llava
    answerer = HFAnswerer(model, processor)
    answers = answer_requests(answerer, TASK_DOCS, generate_args(), "generate_until")
    assert len(answers) == 3 and all(len(a.split()) == 4 and a.startswith("w") for a in answers)

    # The same prompt through the zoo's own inputs: image tokens expanded by the processor, same greedy tokens.
    inputs = answerer.inputs(answerer.prompt(DOCS[0]["question"], [DOCS[0]["image"]]), [DOCS[0]["image"]])
    assert int((inputs["input_ids"] == vlm.IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answers[0] == " ".join(f"w{int(t)}" for t in out[0, inputs["input_ids"].shape[1] :])

    stop = answers[1].split()[2]
    cut = answer_requests(answerer, TASK_DOCS, generate_args(until=[stop]), "generate_until")
    assert cut[1] == " ".join(answers[1].split()[:2]) and cut[0] == answers[0].split(stop)[0].strip()

    # loglikelihood: the greedy answer is greedy; a different one is not, and is less likely.
    other = " ".join(f"w{(int(w[1:]) + 1) % 240 + 3}" for w in answers[0].split())
    ll = [
        (d["question"], cont, doc_to_visual, 0, "tiny_vqa", "test")
        for d, cont in ((DOCS[0], answers[0]), (DOCS[0], other))
    ]
    (lp_greedy, greedy), (lp_other, not_greedy) = answer_requests(answerer, TASK_DOCS, ll, "loglikelihood")
    assert greedy and not not_greedy and lp_other < lp_greedy < 0
    with pytest.raises(ValueError, match="multi-round"):
        answer_requests(answerer, TASK_DOCS, ll, "generate_until_multi_round")
    with pytest.raises(ValueError, match="image tasks only"):
        answerer.prompt("w5", ["video.mp4"])


def test_loglikelihood_lines_up_under_pruning(llava, patched):
    """The continuation's logits are taken from the end, where pruning (which shortens the prompt) leaves them."""
    model, processor = llava
    answerer = HFAnswerer(model, processor)
    doc = DOCS[2]
    patched(model, "lossless", prune=accel.pruning.PruneConfig(keep=4))
    pruned_answer = answerer.generate(doc["question"], [doc["image"]], {"max_new_tokens": 3})
    _, greedy = answerer.loglikelihood(doc["question"], pruned_answer, [doc["image"]])
    assert greedy
    assert accel.get_handle(model).unit("prune").last.visual_kept == [4]


def exact_match_runner(reference: dict, seen: list):
    """An in-memory task in lmms-eval's request format: exact match against `reference` answers."""

    def run(model, processor, tasks, limit):
        handle = accel.get_handle(model)
        unit = handle.unit("prune") if handle is not None else None
        seen.append(None if unit is None else unit.config.keep)
        args = generate_args()[:limit]
        answers = answer_requests(HFAnswerer(model, processor), TASK_DOCS, args, "generate_until")
        if not reference:
            reference.update(enumerate(answers))
        match = [float(a == reference[i]) for i, a in enumerate(answers)]
        first = [float(a.split()[0] == reference[i].split()[0]) for i, a in enumerate(answers)]
        return {
            "tiny_vqa": {"exact_match": sum(match) / len(match)},
            "tiny_first": {"first_word": sum(first) / len(first), "answers": len(answers)},
        }

    return run


def test_evaluate_pruning_patches_each_budget_and_builds_the_table(llava):
    model, processor = llava
    reference, seen = {}, []
    result = evaluate_pruning(
        model,
        processor,
        exact_match_runner(reference, seen),
        ["tiny_vqa", "tiny_first"],
        keep=(8, 2),
        prune_options={"contextual": 0.0},
        limit=3,
    )
    assert seen == [None, 8, 2] and accel.get_handle(model) is None
    assert [r.variant for r in result.rows] == ["baseline", "keep=8", "keep=2"]
    assert result.headline == {"tiny_vqa": "exact_match", "tiny_first": "first_word"}
    base, k8, k2 = result.rows
    assert base.scores == {"tiny_vqa": 1.0, "tiny_first": 1.0} and base.mean_relative == 1.0
    assert base.visual_tokens_in is None
    assert (k8.visual_tokens_in, k8.visual_tokens_kept, k2.visual_tokens_kept) == (IMAGE_TOKENS, 8, 2)
    for row in (k8, k2):
        assert row.relative == row.scores  # baseline scores are 1
        assert row.mean_relative == pytest.approx(sum(row.scores.values()) / 2)
        assert row.metrics["tiny_first"]["answers"] == 3
    assert k2.scores["tiny_vqa"] < 1.0  # 2 of 16 tokens changes some answer of the random model

    table = result.to_markdown().splitlines()
    assert table[0] == "| variant | visual tokens | tiny_vqa (exact_match) | tiny_first (first_word) | % of baseline |"
    assert table[2] == "| baseline | 16 | 1 | 1 | 100.0% |"
    assert table[4].startswith("| keep=2 | 2 | ") and table[4].endswith(f" | {k2.mean_relative:.1%} |")
    assert f"{k2.scores['tiny_vqa']:.4g} ({k2.relative['tiny_vqa']:.1%})" in table[4]
    assert json.loads(json.dumps(result.to_dict()))["rows"][1]["keep"] == 8
    assert result.prune_options == {"contextual": 0.0}


def test_evaluate_pruning_unpatches_on_failure_and_checks_inputs(llava, patched):
    model, processor = llava

    def failing(model, processor, tasks, limit):
        if accel.get_handle(model) is not None:
            raise RuntimeError("boom")
        return {"t": {"acc": 0.5}}

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_pruning(model, processor, failing, ["t"], keep=(4,))
    assert accel.get_handle(model) is None
    with pytest.raises(ValueError, match=r"no scores for \['u'\]"):
        evaluate_pruning(model, processor, failing, ["t", "u"], keep=())
    with pytest.raises(ValueError, match="budgets come from keep="):
        evaluate_pruning(model, processor, failing, ["t"], prune_options={"keep_ratio": 0.5})
    patched(model, "lossless", prune=True)
    with pytest.raises(accel.AlreadyPatchedError):
        evaluate_pruning(model, processor, failing, ["t"])


def test_lmms_eval_results_are_read_as_plain_metrics():
    raw = {
        "alias": "pope",
        "pope_accuracy,none": 0.86,
        "pope_accuracy_stderr,none": "N/A",
        "pope_f1_score,none": 0.85,
        "exact_match,strict": 0.5,
        "submission,none": None,
    }
    metrics = evaluate._plain_metrics(raw)
    assert metrics == {"pope_accuracy": 0.86, "pope_f1_score": 0.85, "exact_match,strict": 0.5}
    assert evaluate.headline_metric("pope", metrics) == "pope_f1_score"
    assert evaluate.headline_metric("other", metrics) == "pope_accuracy"


def test_missing_lmms_eval_names_the_install_command(monkeypatch, llava):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        evaluate.run_lmms_eval(*llava, ["gqa"])
    with pytest.raises(SystemExit, match="pip install lmms-eval"):
        main(["eval", "--model", "never-loaded", "--tasks", "gqa"])


RUNNER_FILE = """
def run(model, processor, tasks, limit):
    from accel.bench.evaluate import HFAnswerer
    import accel
    handle = accel.get_handle(model)
    kept = handle.unit("prune").config.keep if handle else 16
    answer = HFAnswerer(model, processor).generate("w5 w6", [], {"max_new_tokens": 2})
    return {t: {"score": float(kept), "answer_words": len(answer.split())} for t in tasks}
"""


def test_cli_eval_loads_a_local_model_and_writes_the_table(tmp_path, llava, capsys):
    model, processor = llava
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "my_eval.py").write_text(RUNNER_FILE)
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    argv = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--tasks",
        "a,b",
        "--keep",
        "8,4",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--runner",
        f"{tmp_path / 'my_eval.py'}:run",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
    ]
    assert main(argv) == 0
    data = json.loads(out_json.read_text())
    assert [r["variant"] for r in data["rows"]] == ["baseline", "keep=8", "keep=4"]
    assert [r["scores"]["a"] for r in data["rows"]] == [16.0, 8.0, 4.0]
    assert data["rows"][2]["mean_relative"] == 0.25 and data["headline"] == {"a": "score", "b": "score"}
    assert data["prune_options"] == {"where": "before_lm"} and data["model"] == str(tmp_path / "model")
    md = out_md.read_text()
    assert "| keep=4 | - | 4 (25.0%) | 4 (25.0%) | 25.0% |" in md  # text-only prompts: no visual tokens counted
    assert md.strip() in capsys.readouterr().out
    assert all(r["metrics"]["a"]["answer_words"] == 2 for r in data["rows"])
    assert accel.get_handle(model) is None


TASK_YAML = """\
task: tiny_vqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def test_real_lmms_eval_on_a_local_task(tmp_path, llava):
    """Where lmms-eval is installed: its evaluator, a YAML task over a local data set, our model object."""
    pytest.importorskip("lmms_eval")
    import datasets

    model, processor = llava
    answerer = HFAnswerer(model, processor)
    answers = [answerer.generate(d["question"], [d["image"]], {"max_new_tokens": 4}) for d in DOCS]
    answers[0] = "w3"  # one wrong answer: baseline exact match 2/3
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    data = datasets.Dataset.from_dict(
        {"image": [d["image"] for d in DOCS], "question": [d["question"] for d in DOCS], "answer": answers},
        features=features,
    )
    datasets.DatasetDict({"test": data}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_vqa.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    (tmp_path / "tasks" / "tiny_utils.py").write_text(TASK_UTILS)

    def runner(model, processor, tasks, limit):
        return evaluate.run_lmms_eval(model, processor, tasks, limit, include_path=str(tmp_path / "tasks"))

    result = evaluate_pruning(model, processor, runner, ["tiny_vqa"], keep=(16, 2))
    assert [r.scores["tiny_vqa"] for r in result.rows[:2]] == [pytest.approx(2 / 3)] * 2  # keep=16 keeps all
    assert result.rows[2].visual_tokens_kept == 2 and accel.get_handle(model) is None
