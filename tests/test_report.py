"""The report's JSON layout: every built-in accelerator writes exactly the keys `accel.report` documents, the
whole report survives json.dumps/json.loads, and the one printer makes any of it readable."""

import json
import os
import re
import warnings

import pytest

import accel
import accel.report
from accel.attention.sparse import SparseConfig
from accel.pruning import PruneConfig
from accel.quant import QuantConfig
from accel.report import Report, format_stats
from accel.zoo import build

_SECTION = re.compile(r'^(?:to_dict\(\)|stats\["(\w+)"\])')
# "    key   description", or a placeholder alone on its line ("<branch>": the keys there are data)
_KEY = re.compile(r"^( +)(?:([a-z][a-z0-9_]*) {2,}\S|(<\w+>)$)")


def documented() -> dict:
    """{"": the top level, keyword: its stats} from the module docstring; each maps a key to its children."""
    sections, stack = {}, None
    for line in accel.report.__doc__.splitlines():
        head = _SECTION.match(line)
        if head:
            stack = [(-1, sections.setdefault(head.group(1) or "", {}))]
            continue
        key = _KEY.match(line) if stack else None
        if key:
            indent = len(key.group(1))
            while stack[-1][0] >= indent:
                stack.pop()
            children = stack[-1][1].setdefault(key.group(2) or key.group(3), {})
            stack.append((indent, children))
    return sections


def check_layout(value, tree: dict, where: str, seen: set) -> None:
    """`value` has exactly the documented keys, recursively; `seen` collects the documented paths met non-null."""
    if not tree or value is None:
        return
    seen.add(where)
    if isinstance(value, list):
        for item in value:
            check_layout(item, tree, where, seen)
        return
    assert isinstance(value, dict), (where, value)
    if len(tree) == 1 and next(iter(tree)).startswith("<"):
        placeholder = next(iter(tree))
        for item in value.values():
            check_layout(item, tree[placeholder], f"{where}.{placeholder}", seen)
        return
    assert set(value) == set(tree), (where, sorted(value), sorted(tree))
    for key, children in tree.items():
        check_layout(value[key], children, f"{where}.{key}", seen)


def nested_paths(tree: dict, where: str) -> set:
    """Documented paths that have children of their own."""
    paths = {where} if tree else set()
    for key, children in tree.items():
        paths |= nested_paths(children, f"{where}.{key}")
    return paths


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def reports() -> list[tuple[dict, str]]:
    """(to_dict(), str) of one report with quant (W4A8, calibrated), attention, sparse and cache on a tiny Wan
    (two pipeline calls), and of one with pruning (and the preset's skips) on a tiny LLaVA."""
    wan, llava = build("wan"), build("llava")  # their own instances: quantization moves weights around
    quant = QuantConfig(
        group_size=32,
        min_features=0,
        activations="int8",
        kernel="w4a8-reference",
        calibration=lambda: wan.run(seed=1, num_inference_steps=2),
    )
    sparse = SparseConfig(target=0.5, block_q=16, block_k=16, stride=8, dense_fraction=0.2)
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # sparse attention through its PyTorch reference: faster on a CPU
    out = []
    try:
        for model, kwargs, runs in (
            (wan, {"quant": quant, "attention": "int8", "sparse": sparse}, ({}, {"num_inference_steps": 4})),
            (llava, {"prune": PruneConfig(keep_ratio=0.5)}, ({},)),
        ):
            handle = _quiet(accel.patch, model.obj, "fast", **kwargs)
            try:
                for run in runs:
                    _quiet(model.run, seed=0, **run)
                out.append((handle.report().to_dict(), str(handle)))
            finally:
                accel.unpatch(model.obj)
    finally:
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return out


def test_every_accelerator_writes_exactly_the_documented_keys_as_json(reports):
    docs = documented()
    assert set(docs) == {"", "cache", "attention", "sparse", "prune", "quant"}
    seen: set = set()
    names = set()
    for data, _ in reports:
        assert json.loads(json.dumps(data, allow_nan=False)) == data
        check_layout(data, docs[""], "report", seen)
        for name, stats in data["stats"].items():
            names.add(name)
            check_layout(stats, docs[name], name, seen)
    assert names == set(docs) - {""}
    expected = nested_paths(docs[""], "report")
    for name in names:
        expected |= nested_paths(docs[name], name)
    assert expected <= seen, sorted(expected - seen)  # every documented record was met, non-null


def test_print_shows_each_cache_call_per_branch_on_a_line_or_two(reports):
    data, text = reports[0]
    calls = data["stats"]["cache"]["calls"]
    assert len(calls) == 2 and calls[-1]["num_steps"] == 4
    lines = text.splitlines()
    start = lines.index("      2. num steps: 4, computed: {computed}, reused: {reused}".format(**calls[-1]))
    for name, branch in calls[-1]["branches"].items():
        first = next(i for i in range(start, len(lines)) if lines[i].lstrip().startswith(f"{name}: {{computed: "))
        indent = len(lines[first]) - len(lines[first].lstrip())
        more = 0
        while first + 1 + more < len(lines) and lines[first + 1 + more].startswith(" " * (indent + 1)):
            more += 1
        assert more <= 1, lines[first : first + 2 + more]
        assert f"reused: [{', '.join(map(str, branch['reused']))}]" in " ".join(lines[first : first + 2 + more])
    assert "visual tokens kept total: " in reports[1][1] and "skipped  cache" in reports[1][1]


def test_printer_humanises_schema_keys_keeps_data_keys_and_shortens_step_runs():
    stats = {
        "search_s": 0.5,
        "per_layer": {"blocks.0.to_q": 0.25, "proj_out": 0.125},  # data: printed as they are
        "calls": [{"num_steps": 9, "branches": {"cond": {"computed": [0, 1, 2, 3, 7], "reused": [4, 5, 6, 8]}}}],
        "last_call": None,
    }
    lines = format_stats(stats, "  ")
    assert lines[0] == "  search s: 0.5"
    assert lines[1] == "  per layer: {blocks.0.to_q: 0.25, proj_out: 0.125}"
    assert lines[2] == "  calls: [{num steps: 9, branches: {cond: {computed: [0..3, 7], reused: [4..6, 8]}}}]"
    assert lines[3:] == ["  last call: n/a"]
    long = {
        "calls": [
            {
                "num_steps": 50,
                "branches": {"cond": {"computed": list(range(0, 50, 2)), "reused": list(range(1, 50, 2))}},
            }
        ]
    }
    lines = format_stats(long)
    assert lines[:3] == ["calls:", "  1. num steps: 50", "     branches:"]
    assert lines[3].startswith("       cond: {computed: [0, 2, 4,") and all(len(line) <= 110 for line in lines)


def test_report_prints_a_third_party_accelerators_stats():
    report = Report(model="M", family=None, preset="balanced")
    report.stats["timing"] = {"calls": 3, "total_s": 1.5}
    assert str(report).splitlines()[-3:] == ["  stats    timing", "    calls: 3", "    total s: 1.5"]
    assert json.loads(json.dumps(report.to_dict()))["stats"] == {"timing": {"calls": 3, "total_s": 1.5}}
