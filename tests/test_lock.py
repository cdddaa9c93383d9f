"""The lock (constraints.txt: the exact versions CI and `make demo` install) and pyproject.toml's ranges
(what users must accept) cannot drift apart: every direct dependency is locked, inside its range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and not req.marker and not req.extras, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} is locked twice"
        pins[name] = Version(spec[0].version)
    return pins


def direct_requirements(project: dict) -> list[tuple[str, Requirement]]:
    """(where, requirement) for `dependencies` and every extra, leaving out bgmask's own extras (`all`)."""
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        reqs += [(f"[{extra}]", Requirement(r)) for r in items]
    return [(where, r) for where, r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = read_lock(ROOT / "constraints.txt")


@pytest.mark.parametrize("where,req", direct_requirements(PROJECT), ids=lambda x: str(x))
def test_locked_version_lies_in_declared_range(where, req):
    name = canonicalize_name(req.name)
    assert name in LOCK, f"{req.name} ({where}) is not in constraints.txt"
    assert req.specifier.contains(LOCK[name], prereleases=True), \
        f"constraints.txt has {req.name}=={LOCK[name]}, outside {where} {req}"


def test_every_range_has_a_lower_bound():
    """A range starts at a tested version: no requirement is bare or open below."""
    for where, req in direct_requirements(PROJECT):
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), f"{where} {req}: no lower bound"


def test_all_extra_names_every_other_extra():
    """`make` installs `.[all]`: CI and the demo get captum, wandb and the MMSeg stack."""
    extras = PROJECT["optional-dependencies"]
    (everything,) = [Requirement(r) for r in extras["all"]]
    assert canonicalize_name(everything.name) == canonicalize_name(PROJECT["name"])
    assert everything.extras == set(extras) - {"all"}


def test_read_lock_refuses_ranges_and_duplicates(tmp_path):
    bad = tmp_path / "c.txt"
    for text in ("torch>=2.11\n", "torch==2.11.0\nTorch==2.12.0\n"):
        bad.write_text(text)
        with pytest.raises(AssertionError):
            read_lock(bad)
    bad.write_text("# header\n\nnumpy==2.4.6  # why\n")
    assert read_lock(bad) == {"numpy": Version("2.4.6")}
