"""Every shipped data file (reference weights, example workflows) is named by a package-data pattern, so a
wheel or a non-editable install carries it (an editable install would hide a missing pattern)."""

from __future__ import annotations

import glob
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_package_data_patterns_cover_every_shipped_file():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, folder in (("accel.zoo", "weights"), ("accel.comfy", "examples")):
        root = REPO / package.replace(".", "/")
        covered = {p for pattern in patterns[package] for p in glob.glob(pattern, root_dir=root)}
        shipped = {str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.is_file()}
        assert shipped and shipped <= covered, sorted(shipped - covered)
