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
