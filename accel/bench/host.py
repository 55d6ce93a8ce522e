"""What a benchmark ran on, and where its JSON goes.

    env = environment("cuda")           # versions, GPU, CPU, threads: the "env" / "machine" of every result
    path = default_json_path(Path("benchmarks/results"), "caching", env, tiny=False)
    write_json(path, {"env": env, ...})  # atomic: a reader (or a kill) never sees half a file

torch and the optional packages are imported inside the functions, so importing this module costs nothing
beyond `accel` itself.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

_VERSIONS = ("triton", "diffusers", "transformers")  # torch: the running build, e.g. "2.13.0+cu128"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: Any = "cpu") -> dict[str, Any]:
    """Host and package facts for a result's JSON: the device and GPU (name, compute capability, CUDA), CPU,
    threads, the versions of accel, torch, triton, diffusers and transformers, and whether Triton interprets."""
    import torch

    import accel

    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(device) if cuda else None
    env: dict[str, Any] = dict(
        device=str(device),
        device_name=gpu or f"CPU ({platform.processor() or platform.machine()})",
        gpu=gpu,
        capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        cuda=torch.version.cuda if cuda else None,
        accel=accel.__version__,
        torch=torch.__version__,
    )
    env.update({name: _version(name) for name in _VERSIONS})
    env.update(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )
    return env


def slug(text: str | None) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3" (file-name safe); None or nothing -> "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-") or "cpu"


def default_json_path(folder: Path, name: str, env: dict[str, Any], tiny: bool) -> Path:
    """<folder>/<name>-<gpu>.json, or <name>-cpu-tiny.json for a --tiny check."""
    return Path(folder) / f"{name}-{slug(env.get('gpu'))}{'-tiny' if tiny else ''}.json"


def to_json(value: Any) -> Any:
    """`value` as plain JSON: dataclasses and tuples become dicts and lists, non-finite floats the strings
    "inf" / "-inf" / "nan", anything else that JSON has no type for its `str`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_json(path: Path | str, doc: Any, indent: int = 2) -> Path:
    """Write `to_json(doc)` to `path` (folders created) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_json(doc), indent=indent) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["default_json_path", "environment", "slug", "to_json", "write_json"]
