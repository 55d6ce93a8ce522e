"""Benchmark accuracy of visual token pruning: the unpruned baseline, then `PruneConfig(keep=k)` per budget, on
standard VLM benchmarks through lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval).

    accel eval --model llava-hf/llava-1.5-7b-hf --tasks gqa,mme,pope,textvqa_val --keep 192,128,64 --device cuda

or from Python:

    model, processor = load_model("llava-hf/llava-1.5-7b-hf", device="cuda")
    result = evaluate_pruning(model, processor, run_lmms_eval, ["gqa", "pope"], keep=(192, 128, 64))
    print(result.to_markdown())

A *runner* scores one model on the tasks: `runner(model, processor, tasks, limit) -> {task: {metric: value}}`.
`run_lmms_eval` is the real one: lmms-eval loads the data sets and scores the answers, and `HFAnswerer` answers
its requests with the (patched) Hugging Face model, one request at a time. `evaluate_pruning` patches the model
for each budget, calls the runner, unpatches, and builds the table. Needs `pip install lmms-eval` and the data
sets (lmms-eval downloads them from the Hugging Face Hub); image tasks only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import accel
from accel.pruning import PruneConfig

STANDARD_TASKS = ("gqa", "mme", "pope", "textvqa_val")
STANDARD_KEEP = (192, 128, 64)
# The number papers report per task; other tasks use their first metric (the table names it).
HEADLINE_METRICS = {
    "gqa": "exact_match",
    "mme": "mme_perception_score",
    "pope": "pope_f1_score",
    "textvqa_val": "exact_match",
    "vqav2_val": "exact_match",
    "scienceqa_img": "exact_match",
    "mmbench_en_dev": "gpt_eval_score",
    "seedbench": "seed_image",
    "mmmu_val": "mmmu_acc",
}
DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs give none

Runner = Callable[[Any, Any, list, "int | float | None"], dict]
INSTALL_HINT = "accel eval runs benchmarks through lmms-eval, which is not installed: pip install lmms-eval"


# ------------------------------------------------------------------------------------------------ model side


def load_model(model_id: str, *, device: str = "cuda", dtype: str = "bfloat16", attn_implementation: str = "sdpa"):
    """(model, processor) of a Hugging Face VLM id or local directory, in eval mode on `device`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    return model.to(device).eval(), processor


class HFAnswerer:
    """Answers lmms-eval-style requests with a Hugging Face VLM and its processor, one request at a time.

    The prompt is the processor's chat template with one image entry per visual, then the task's text.
    Greedy decoding unless a task asks for a temperature; the answer is cut at the task's stop strings.
    """

    def __init__(self, model, processor, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_new_tokens = max_new_tokens

    def prompt(self, context: str, visuals: list) -> str:
        for v in visuals:
            if not hasattr(v, "size") or isinstance(v, (str, bytes)):
                raise ValueError(
                    f"accel eval answers image tasks only; this task gave a {type(v).__name__} visual "
                    "(video tasks pass file paths). Choose image tasks"
                )
        content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def inputs(self, text: str, visuals: list) -> dict:
        batch = self.processor(text=[text], images=visuals or None, return_tensors="pt")
        dtype = self.model.dtype
        return {
            k: (v.to(self.model.device, dtype) if v.is_floating_point() else v.to(self.model.device))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    @torch.no_grad()
    def generate(self, context: str, visuals: list, gen_kwargs: dict) -> str:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        inputs = self.inputs(self.prompt(context, visuals), visuals)
        temperature = gen_kwargs.get("temperature") or 0
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": gen_kwargs.get("top_p")}
            if temperature > 0
            else {"do_sample": False}
        )
        out = self.model.generate(
            **inputs,
            **sampling,
            max_new_tokens=gen_kwargs.get("max_new_tokens") or self.max_new_tokens,
            num_beams=gen_kwargs.get("num_beams") or 1,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, visuals: list) -> tuple[float, bool]:
        """(log-probability of `continuation` after the prompt, whether greedy decoding would produce it)."""
        inputs = self.inputs(self.prompt(context, visuals), visuals)
        cont = torch.tensor(
            [self.tokenizer(continuation, add_special_tokens=False)["input_ids"]], device=inputs["input_ids"].device
        )
        if cont.shape[1] == 0:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        length = inputs["input_ids"].shape[1]
        for key, value in list(inputs.items()):  # per-token tensors grow by the continuation
            if value.ndim == 2 and value.shape == (1, length):
                tail = (
                    cont
                    if key == "input_ids"
                    else (torch.ones_like(cont) if key == "attention_mask" else torch.zeros_like(cont))
                )
                inputs[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
        # Pruning shortens the prompt, never the continuation: the last logits line up with it either way.
        logits = self.model(**inputs).logits[0, -cont.shape[1] - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = cont[0]
        total = float(logprobs.gather(1, target[:, None]).sum())
        return total, bool((logits.argmax(-1) == target).all())


def answer_requests(answerer: HFAnswerer, task_docs: dict, request_args: list[tuple], kind: str) -> list:
    """Answers of lmms-eval requests, given as their `Instance.args`:
    `(context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)`; `task_docs[task][split][doc_id]`
    is the document (lmms-eval's `lm.task_dict`)."""
    from tqdm.auto import tqdm

    answers = []
    for context, second, doc_to_visual, doc_id, task, split in tqdm(request_args, desc=kind, leave=False):
        doc = task_docs[task][split][doc_id]
        visuals = list(doc_to_visual(doc) or []) if doc_to_visual is not None else []
        if kind == "generate_until":
            answers.append(answerer.generate(context, visuals, second))
        elif kind == "loglikelihood":
            continuation = second if isinstance(second, str) else second(doc)
            answers.append(answerer.loglikelihood(context, continuation, visuals))
        else:
            raise ValueError(f"accel eval does not answer {kind!r} requests (multi-round tasks)")
    return answers


# ------------------------------------------------------------------------------------------------ lmms-eval


def _require_lmms_eval():
    try:
        import lmms_eval.evaluator  # noqa: F401
        from lmms_eval.api.model import lmms
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return lmms


def lmms_model(answerer: HFAnswerer):
    """An lmms-eval model object (`lmms_eval.api.model.lmms`) that delegates to `answerer`."""
    lmms = _require_lmms_eval()

    class AccelHF(lmms):
        def __init__(self):
            super().__init__()
            self.answerer = answerer

        @property
        def device(self):
            return answerer.model.device

        def generate_until(self, requests):
            return answer_requests(answerer, self.task_dict, [r.args for r in requests], "generate_until")

        def loglikelihood(self, requests):
            return answer_requests(answerer, self.task_dict, [r.args for r in requests], "loglikelihood")

        def generate_until_multi_round(self, requests):
            return answer_requests(answerer, self.task_dict, [r.args for r in requests], "generate_until_multi_round")

        def clean(self):
            pass  # the base class deletes the model's modules; the next budget reuses them

    return AccelHF()


def run_lmms_eval(
    model,
    processor,
    tasks: list[str],
    limit: int | float | None = None,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    include_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of `model` on lmms-eval `tasks` (`limit`: documents per task, for a quick look): {task: {metric: v}}.
    `include_path`: a folder of your own lmms-eval task YAML files, next to the built-in tasks."""
    _require_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = simple_evaluate(
        model=lmms_model(HFAnswerer(model, processor, max_new_tokens=max_new_tokens)),
        tasks=list(tasks),
        limit=limit,
        batch_size=1,
        log_samples=False,
        bootstrap_iters=0,
        task_manager=TaskManager("WARNING", include_path=include_path),
        verbosity="WARNING",
    )
    return {task: _plain_metrics(values) for task, values in out["results"].items()}


def _plain_metrics(values: dict) -> dict[str, float]:
    """lmms-eval's {"exact_match,none": 0.61, "exact_match_stderr,none": "N/A", "alias": ...} ->
    {"exact_match": 0.61} (metrics under another filter keep it in their name)."""
    metrics = {}
    for key, value in values.items():
        name, _, filter_name = key.partition(",")
        if "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[name if filter_name in ("", "none") else key] = float(value)
    return metrics


# ------------------------------------------------------------------------------------------------ the table


@dataclass
class EvalRow:
    variant: str  # "baseline" or "keep=64"
    keep: int | None
    scores: dict[str, float]  # task -> headline metric
    relative: dict[str, float]  # task -> score / baseline score
    mean_relative: float | None
    visual_tokens_in: float | None  # per prefill with visual tokens, mean (from the pruning unit's counters)
    visual_tokens_kept: float | None
    seconds: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # everything the runner returned


@dataclass
class EvalResult:
    tasks: list[str]
    headline: dict[str, str]  # task -> metric shown
    rows: list[EvalRow]
    prune_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "headline": self.headline,
            "prune_options": self.prune_options,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_markdown(self) -> str:
        head = ["variant", "visual tokens"] + [f"{t} ({self.headline[t]})" for t in self.tasks] + ["% of baseline"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base_tokens = next((r.visual_tokens_in for r in self.rows if r.visual_tokens_in is not None), None)
        for row in self.rows:
            tokens = row.visual_tokens_kept if row.keep is not None else base_tokens
            cells = [row.variant, "-" if tokens is None else f"{tokens:.0f}"]
            for task in self.tasks:
                value, rel = row.scores[task], row.relative.get(task)
                cells.append(f"{value:.4g}" if row.keep is None or rel is None else f"{value:.4g} ({rel:.1%})")
            cells.append("-" if row.mean_relative is None else f"{row.mean_relative:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def headline_metric(task: str, metrics: dict[str, float]) -> str:
    preferred = HEADLINE_METRICS.get(task)
    if preferred in metrics:
        return preferred
    if not metrics:
        raise ValueError(f"the runner returned no numeric metric for task {task!r}")
    return next(iter(metrics))


def evaluate_pruning(
    model,
    processor,
    runner: Runner,
    tasks: list[str],
    *,
    keep=STANDARD_KEEP,
    prune_options: dict | None = None,
    limit: int | float | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """The unpatched baseline, then `accel.patch(model, "lossless", prune=PruneConfig(keep=k, **prune_options))` for
    each k in `keep`, each scored by `runner(model, processor, tasks, limit)`; the model is unpatched after each."""
    if accel.get_handle(model) is not None:
        raise accel.AlreadyPatchedError(
            "evaluate_pruning needs the unpatched model as its baseline; call accel.unpatch"
        )
    tasks, options = list(tasks), dict(prune_options or {})
    for name in ("keep", "keep_ratio", "mass"):
        if name in options:
            raise ValueError(f"prune_options sets {name!r}; the budgets come from keep=")
    budgets = [None, *keep]
    raw_rows = []
    for k in budgets:
        start = time.perf_counter()
        tokens = (None, None)
        if k is None:
            metrics = runner(model, processor, tasks, limit)
        else:
            handle = accel.patch(model, "lossless", prune=PruneConfig(keep=k, **options))
            try:
                metrics = runner(model, processor, tasks, limit)
                stats = handle.report().stats["prune"]
                calls = stats["calls"]
                if calls:
                    tokens = (stats["visual_tokens_in_total"] / calls, stats["visual_tokens_kept_total"] / calls)
            finally:
                accel.unpatch(model)
        missing = [t for t in tasks if t not in metrics]
        if missing:
            raise ValueError(f"the runner returned no scores for {missing} (it returned {sorted(metrics)})")
        raw_rows.append((k, metrics, tokens, time.perf_counter() - start))
        if log is not None:
            log(f"{'baseline' if k is None else f'keep={k}'} done in {raw_rows[-1][3]:.1f} s")

    headline = {t: headline_metric(t, raw_rows[0][1][t]) for t in tasks}
    base = {t: raw_rows[0][1][t][headline[t]] for t in tasks}
    rows = []
    for k, metrics, (tokens_in, tokens_kept), seconds in raw_rows:
        scores = {t: metrics[t][headline[t]] for t in tasks}
        relative = {t: scores[t] / base[t] for t in tasks if base[t]}
        mean = sum(relative.values()) / len(relative) if relative else None
        rows.append(
            EvalRow(
                "baseline" if k is None else f"keep={k}",
                k,
                scores,
                relative,
                mean,
                tokens_in,
                tokens_kept,
                seconds,
                metrics,
            )
        )
    return EvalResult(tasks, headline, rows, options)


__all__ = [
    "EvalResult",
    "EvalRow",
    "HFAnswerer",
    "STANDARD_KEEP",
    "STANDARD_TASKS",
    "answer_requests",
    "evaluate_pruning",
    "headline_metric",
    "lmms_model",
    "load_model",
    "run_lmms_eval",
]
