"""pyproject.toml's dependency floors are versions the suite runs with: each installed version satisfies its
requirement, and no floor sits below the installed minor release (an older one would be untested)."""

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def test_floors_are_the_tested_versions():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    checked = 0
    for line in project["dependencies"]:
        req = Requirement(line)
        installed = Version(version(req.name))
        assert installed in req.specifier, f"{req.name} {installed} does not satisfy {req}"
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert floors, f"{req.name} has no floor"
        floor = floors[0].release[:2]  # major.minor (or major alone)
        assert floor >= installed.release[: len(floor)], f"{req.name}: floor {floors[0]} is below the tested {installed}"
        checked += 1
    assert checked >= 15


def test_ci_constraints_pin_every_dependency_at_the_installed_version():
    """.ci/setup installs under .ci/constraints.txt; a pin that drifts from the tested venv, or a dependency
    left unpinned, would let CI test something else than the suite last ran with."""
    root = Path(__file__).parents[1]
    pins = {}
    for line in (root / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]  # .ci/setup installs .[test,app,fast]
    for line in project["dependencies"] + extras["test"] + extras["app"] + extras["fast"]:
        req = Requirement(line)
        pin = pins.get(req.name.lower().replace("_", "-"))
        assert pin is not None, f"{req.name} is not pinned in .ci/constraints.txt"
        pinned = Version(next(iter(pin.specifier)).version)
        assert pinned in req.specifier, f"{req.name}: pin {pinned} does not satisfy {req}"
        assert Version(version(req.name)).public == pinned.public, f"{req.name}: installed differs from pin {pinned}"
