"""The locked stack: the declared ranges hold the locked versions, and CI runs exactly the lock."""

from __future__ import annotations

import importlib.metadata as md
import os
import re

import pytest
import tomllib
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "locks" / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", pkg).lower()] = version
    return pins


def _requirements() -> list[Requirement]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in meta["dependencies"]]


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("lock", ["core", "serve"])
def test_every_locked_version_is_inside_the_declared_range(lock: str) -> None:
    pins = _lock(lock)
    for req in _requirements():
        version = pins.get(_key(req.name))
        assert version is not None, f"{req.name} is a dependency but missing from locks/{lock}.txt"
        assert req.specifier.contains(Version(version), prereleases=True), (lock, str(req), version)


def test_the_declared_ranges_are_what_the_locks_tested() -> None:
    """Each lower bound is met by the oldest locked version; pinned-internals upper bounds stop at the newest."""
    core, serve = _lock("core"), _lock("serve")
    for req in _requirements():
        tested = sorted({Version(core[_key(req.name)]), Version(serve[_key(req.name)])})
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lows, f"{req.name} has no lower bound"
        assert lows[0] <= tested[0], (str(req), tested)
    by_name = {r.name: r for r in _requirements()}
    newest_transformers = Version(core["transformers"])
    assert by_name["transformers"].specifier.contains(newest_transformers)
    assert not by_name["transformers"].specifier.contains(Version(f"{newest_transformers.major}."
                                                                  f"{newest_transformers.minor + 1}.0"))


def test_this_environment_is_the_lock() -> None:
    """CI runs the tests on the locked stack (scripts/setup.sh); elsewhere a drifted venv is only reported."""
    drift = []
    for name, version in _lock("core").items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            continue
        if Version(have).public != Version(version).public:
            drift.append(f"{name} {have} (lock {version})")
    if drift and os.environ.get("CI") != "true":
        pytest.skip("this environment is not the lock (run bash scripts/setup.sh): " + ", ".join(drift[:5]))
    assert not drift, drift
