"""Every field of every config is checked for type and range at construction (and by dataclasses.replace), and
the error names the class and the field."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from accel.attention.config import AttentionConfig
from accel.attention.sparse import SparseConfig
from accel.caching.config import CacheConfig
from accel.errors import AccelError, ConfigError, ConfigTypeError
from accel.pruning.config import PruneConfig
from accel.quant.config import QuantConfig

NAN, INF = math.nan, math.inf

# field -> values that must be refused: wrong types first, then NaN / infinities, then out-of-range values
BAD = {
    CacheConfig: {
        "threshold": ["0.1", None, True, NAN, INF, -0.1],
        "target": ["0.1", True, NAN, INF, -1],
        "head_blocks": [1.5, True, "1", None, 0, -1],
        "taylor_order": [2.0, False, None, -1, 4],
        "warmup": ["2", True, None, NAN, INF, -1, -0.5, 2.5],
        "cooldown": ["1", True, NAN, -2, -0.1, 1.5],
        "max_consecutive": [3.0, True, None, 0, -1],
        "decision": [None, 1, "sometimes"],
        "forecast": [None, 1, "input"],
        "num_steps": [10.0, True, "10", 0, -5],
    },
    AttentionConfig: {
        "kernel": [None, 8, "int4"],
        "dense_blocks": [0, "0", None, (0, 1.5), (True,), {0}],
        "dense_first_steps": [1.0, True, None, -1],
        "dense_last_steps": [1.0, True, None, -1],
        "dense_roles": ["cross", None, (1,), ("crosss",)],
        "min_query_len": [16.0, True, None, -1],
        "sdpa_backend": [1, "fast"],
        "smooth_q": [1, "yes", None],
        "granularity": [None, "head"],
        "pv": [16, "bf16"],
    },
    SparseConfig: {
        "target": ["0.9", None, True, NAN, INF, 0.0, -0.5, 1.5],
        "block_q": [64.0, True, None, 8, 48, -64],
        "block_k": [64.0, None, 0, 96],
        "dense_fraction": ["0", None, NAN, -0.1, 1.1],
        "search_interval": [2.0, None, 0, -3],
        "method": [None, 3, "magic"],
        "stride": [8.0, None, 0, -8, 7],
        "reorder": [None, 1, "spiral"],
        "int8": [1, "yes"],
        "remainder": [1, "yes", None],
    },
    PruneConfig: {
        "keep": [2.5, True, "64", 0, -1],
        "keep_ratio": ["0.5", True, NAN, INF, 0.0, -0.5, 1.5],
        "mass": ["0.5", NAN, 0.0, 1.5],
        "min_keep": [1.0, True, None, 0],
        "where": [None, 1, "after"],
        "layer": [2.0, True, None, 0],
        "text_queries": [1.0, None, 0],
        "score": [None, "attention"],
        "sampled_queries": [16.0, None, 0],
        "duplicate_similarity": ["0.8", NAN, -1.5, 1.5],
        "contextual": ["0.1", None, NAN, -0.1, 1.0],
        "temporal_threshold": ["0.9", NAN, -1.5, 1.5],
    },
    QuantConfig: {
        "bits": [4.0, True, None, 3, 8],
        "group_size": [128.0, True, None, 48, 512],
        "search": [1, None, "no"],
        "calibration": ["run", 5],
        "calibration_tokens": [128.0, None, 0],
        "rank": [2.0, True, None, -1],
        "exclude": ["*.proj_out", None, (3,)],
        "include": ["blocks.*", (None,)],
        "default_exclusions": [0, None],
        "min_features": [256.0, None, -1],
        "activations": [None, 8, "fp8"],
        "kernel": [None, "cutlass"],
        "keep_original": ["yes", None],
    },
}

CASES = [(cls, name, value) for cls, fields in BAD.items() for name, values in fields.items() for value in values]


def test_every_field_of_every_config_is_covered():
    for cls, fields in BAD.items():
        assert set(fields) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("cls,name,value", CASES, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CASES])
def test_bad_value_names_the_class_and_field(cls, name, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name}=") as err:
        cls(**{name: value})
    assert isinstance(err.value, (AccelError, ValueError))  # existing `except ValueError` still catches it
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name}="):
        dataclasses.replace(cls(), **{name: value})


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (CacheConfig, dict(head_blocks=1.5)),
        (PruneConfig, dict(keep=2.5)),
        (CacheConfig, dict(threshold="0.1")),
        (SparseConfig, dict(block_q=64.0)),
        (AttentionConfig, dict(dense_blocks=0)),
        (CacheConfig, dict(head_blocks=True)),
        (QuantConfig, dict(calibration="run")),
    ],
)
def test_wrong_types_are_type_errors_too(cls, kwargs):
    with pytest.raises(ConfigTypeError, match="must be") as err:
        cls(**kwargs)
    assert isinstance(err.value, TypeError)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_numbers_are_refused_with_finite_in_the_message(value):
    with pytest.raises(ConfigError, match="finite"):
        CacheConfig(target=value)
    with pytest.raises(ConfigError, match="finite"):
        CacheConfig(threshold=value)


VALID = [
    (CacheConfig, dict()),
    (
        CacheConfig,
        dict(
            threshold=0,
            target=0.1,
            head_blocks=2,
            taylor_order=0,
            warmup=3,
            cooldown=0.0,
            max_consecutive=1,
            decision="current",
            num_steps=20,
        ),
    ),
    (CacheConfig, dict(threshold=100, target=0, warmup=0.25, cooldown=2)),
    (AttentionConfig, dict()),
    (
        AttentionConfig,
        dict(
            kernel="sdpa",
            dense_blocks=(0, -1),
            dense_first_steps=2,
            dense_last_steps=1,
            dense_roles=("cross", "vision"),
            min_query_len=0,
            sdpa_backend="math",
            smooth_q=True,
            granularity="block",
            pv="fp8",
        ),
    ),
    (SparseConfig, dict()),
    (
        SparseConfig,
        dict(
            target=1,
            block_q=16,
            block_k=16,
            dense_fraction=0,
            search_interval=1,
            method="exact",
            stride=4,
            reorder=False,
            int8=True,
        ),
    ),
    (PruneConfig, dict()),
    (
        PruneConfig,
        dict(
            keep=64,
            min_keep=1,
            where="in_lm",
            layer=1,
            text_queries=2,
            score="cls",
            sampled_queries=1,
            duplicate_similarity=None,
            contextual=0,
            temporal_threshold=None,
        ),
    ),
    (PruneConfig, dict(keep_ratio=1)),
    (PruneConfig, dict(mass=0.5, temporal_threshold=-1)),
    (QuantConfig, dict()),
    (
        QuantConfig,
        dict(
            bits=4,
            group_size=32,
            search=False,
            calibration=lambda: None,
            calibration_tokens=1,
            rank=4,
            exclude=["*.proj_out"],
            include=["blocks.*"],
            default_exclusions=False,
            min_features=0,
            activations="int8",
            kernel="w4a8-reference",
            keep_original=False,
        ),
    ),
]


@pytest.mark.parametrize("cls,kwargs", VALID, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(VALID)])
def test_defaults_and_representative_values_construct(cls, kwargs):
    config = cls(**kwargs)
    assert dataclasses.replace(config) == config  # replace re-validates what was normalised


def test_values_are_normalised():
    cache = CacheConfig(threshold=np.float32(0.5), head_blocks=np.int64(2), warmup=3.0, cooldown=np.int32(1))
    assert type(cache.threshold) is float and cache.threshold == 0.5
    assert type(cache.head_blocks) is int and cache.head_blocks == 2
    assert cache.warmup == 3 and type(cache.warmup) is int and cache.cooldown == 1 and type(cache.cooldown) is int
    assert CacheConfig(warmup=0.1).warmup == 0.1  # a fraction of the steps
    attention = AttentionConfig(dense_blocks=[0, np.int64(-1)], dense_roles=["cross"])
    assert attention.dense_blocks == (0, -1) and attention.dense_roles == ("cross",)
    assert SparseConfig(int8=np.bool_(True)).int8 is True and SparseConfig(reorder=True).reorder == "per-head"
    assert QuantConfig(exclude=["a"], include=["b"]).exclude == ("a",)
    assert PruneConfig(keep_ratio=1).keep_ratio == 1.0 and PruneConfig(keep=np.int64(8)).keep == 8


def test_cross_field_rules_still_hold():
    with pytest.raises(ConfigError, match="only one of keep, keep_ratio, mass"):
        PruneConfig(keep=4, mass=0.5)
    with pytest.raises(ConfigError, match="SparseConfig.stride=32: must divide"):
        SparseConfig(block_k=16, stride=32)
    with pytest.raises(ConfigError, match="opt in with activations='int8'"):
        QuantConfig(kernel="w4a8")
    with pytest.raises(ConfigError, match="group_size >= 32"):
        QuantConfig(activations="int8", group_size=16)
