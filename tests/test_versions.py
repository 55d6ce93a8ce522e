"""The tested dependency range: pyproject's lower bounds, and the warning accel.patch gives outside the range."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import tiny
from packaging.requirements import Requirement
from packaging.version import Version

from accel import _versions

pytestmark = pytest.mark.compat


@pytest.fixture(autouse=True)
def fresh_check():
    """check_versions caches its answer per process: start each test empty and leave no faked answer behind."""
    _versions._warnings.cache_clear()
    yield
    _versions._warnings.cache_clear()


def fake_versions(monkeypatch, **installed):
    """Make the check see `installed` (package -> version, None for not installed); others at their lowest."""
    lowest = {package: low for package, (low, _) in _versions.TESTED.items()}
    lowest.update(installed)
    monkeypatch.setattr(_versions, "_installed", lowest.get)


def test_lowest_tested_versions_are_pyprojects_lower_bounds():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    lower = {}
    for text in pyproject["project"]["dependencies"]:
        requirement = Requirement(text)
        for spec in requirement.specifier:
            assert spec.operator == ">=", f"{text}: only lower bounds; newer releases get a warning instead"
            lower[requirement.name] = Version(spec.version)
    assert {package: Version(low) for package, (low, _) in _versions.TESTED.items()} == {
        package: lower.get(package) for package in _versions.TESTED
    }
    for low, new in _versions.TESTED.values():
        assert Version(low) <= Version(new)


def test_lower_bound_job_installs_the_lowest_tested_versions():
    pytest.importorskip("tomllib")  # .ci/lower_bounds.py reads pyproject.toml with it
    script = Path(__file__).parents[1] / ".ci" / "lower_bounds.py"
    constraints = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==([^;\s]+)", constraints, re.M))
    assert {package: pins.get(package) for package in _versions.TESTED} == {
        package: low for package, (low, _) in _versions.TESTED.items()
    }


@pytest.mark.parametrize(
    "installed",
    [
        {},  # every package at its lowest tested version
        {"transformers": "5.25.0", "diffusers": "0.42.1", "accelerate": "1.15.0"},
        {"transformers": "5.25.3", "diffusers": "0.42.7"},  # patch releases of the newest tested minor
        {"transformers": "5.20.0", "torch": "2.13.0+cpu"},  # a local build label
        {"accelerate": None},  # not installed
    ],
)
def test_versions_inside_the_range_give_no_warning(monkeypatch, installed):
    fake_versions(monkeypatch, **installed)
    assert _versions.check_versions() == []


@pytest.mark.parametrize(
    "package,version,side",
    [
        ("transformers", "5.16.2", "older than"),
        ("transformers", "5.26.0", "newer than"),
        ("transformers", "6.0.0.dev0", "newer than"),
        ("diffusers", "0.40.0", "older than"),
        ("diffusers", "0.43.0", "newer than"),
        ("torch", "2.11.0+cu130", "older than"),
        ("torch", "2.14.1", "newer than"),
        ("accelerate", "1.0.0", "older than"),
    ],
)
def test_version_outside_the_range_is_named_with_the_range(monkeypatch, package, version, side):
    fake_versions(monkeypatch, **{package: version})
    low, new = _versions.TESTED[package]
    newest_minor = ".".join(new.split(".")[:2])
    (message,) = _versions.check_versions()
    assert message.startswith(f"{package} {version} is {side} the versions accel is tested with")
    assert f"({low} to {newest_minor}.x)" in message
    assert f"install {package}>={low}," in message


def test_unreadable_version_is_reported_not_an_error(monkeypatch):
    fake_versions(monkeypatch, diffusers="nightly")
    (message,) = _versions.check_versions()
    assert message.startswith("diffusers reports version 'nightly'") and "0.41.0" in message


def test_versions_are_read_once_per_process(monkeypatch):
    reads = []
    lowest = {package: low for package, (low, _) in _versions.TESTED.items()}
    monkeypatch.setattr(_versions, "_installed", lambda package: reads.append(package) or lowest[package])
    first = _versions.check_versions()
    first.append("changed by the caller")
    assert _versions.check_versions() == []
    assert sorted(reads) == sorted(_versions.TESTED)


def test_patch_warns_and_reports_a_version_outside_the_range(monkeypatch, patched):
    fake_versions(monkeypatch, transformers="5.99.0")
    model = tiny("sd3")
    with pytest.warns(UserWarning, match=r"transformers 5\.99\.0 is newer than"):
        handle = patched(model.obj, preset="lossless")
    assert any(m.startswith("transformers 5.99.0 is newer than") for m in handle.report().warnings)


def test_patch_in_the_range_gives_no_version_warning(monkeypatch, patched):
    fake_versions(monkeypatch)
    model = tiny("sd3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = patched(model.obj, preset="lossless")
    assert not [w for w in caught if "tested with" in str(w.message)]
    assert not [m for m in handle.report().warnings if "tested with" in m]
