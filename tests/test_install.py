"""pyproject's dependencies against litgpt's installed metadata and requirements.txt's pins, so `pip install .` resolves.

The pip that Python 3.11's `python -m venv` bundles (23.2) gives up with ResolutionImpossible when a package with
extras (``jsonargparse[signatures]``) is required by us with a range that admits a newer release than litgpt's range
does, though the two ranges overlap. A range inside litgpt's own cannot trip it.
"""

from importlib.metadata import requires, version

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import ROOT

tomllib = pytest.importorskip(
    "tomllib", reason="the dependency checks read pyproject.toml with tomllib (Python 3.11+); run them on 3.11 or later"
)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> dict[str, Requirement]:
    """Every requirement pyproject.toml states: build system, dependencies and optional dependencies, by name."""
    project = pyproject()
    lines = project["build-system"]["requires"] + project["project"]["dependencies"]
    for extra in project["project"]["optional-dependencies"].values():
        lines += extra
    found = {}
    for line in lines:
        requirement = Requirement(line)
        found[canonicalize_name(requirement.name)] = requirement
    return found


def litgpt_requirements() -> dict[str, Requirement]:
    """What installing plain litgpt (no extras) requires here, by name."""
    found = {}
    for line in requires("litgpt") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found[canonicalize_name(requirement.name)] = requirement
    return found


def probes(*specifiers: SpecifierSet) -> list[Version]:
    """Versions at and just around every version the specifiers name (4.41 -> 4.40, 4.40.1, 4.41, 4.41.1, 4.42, 5),
    plus 0 and a far-future one: where two ranges built from these bounds differ, one of these lies in one only."""
    found = {Version("0"), Version("9999")}
    for specifier_set in specifiers:
        for specifier in specifier_set:
            release = Version(specifier.version.replace(".*", "")).release
            for changed in (
                release,
                release + (1,),
                release[:-1] + (release[-1] + 1,),
                release[:-1] + (max(release[-1] - 1, 0),),
                release[:-1] + (max(release[-1] - 1, 0), 1),
                (release[0] + 1,),
            ):
                found.add(Version(".".join(map(str, changed))))
    return sorted(found)


def admitted_only_by_first(first: SpecifierSet, second: SpecifierSet) -> list[str]:
    return [str(v) for v in probes(first, second) if first.contains(v) and not second.contains(v)]


def test_probes_find_where_two_ranges_differ():
    """The check below can fail: the range this project once declared is caught, litgpt's own is not."""
    litgpt_range = SpecifierSet(">=4.37,<=4.41")
    assert "4.41.1" in admitted_only_by_first(SpecifierSet(">=4.30,<5"), litgpt_range)
    assert "4.36" in admitted_only_by_first(SpecifierSet(">=4.30,<=4.41"), litgpt_range)
    assert "4.66" in admitted_only_by_first(SpecifierSet(">=4.66"), SpecifierSet(">4.66"))
    assert admitted_only_by_first(SpecifierSet(">=4.38,<4.41"), litgpt_range) == []
    assert admitted_only_by_first(litgpt_range, litgpt_range) == []


def test_every_range_shared_with_litgpt_lies_inside_litgpts():
    ours, theirs = declared(), litgpt_requirements()
    assert "jsonargparse" in theirs, "litgpt's metadata no longer requires jsonargparse: is litgpt 0.5.13 installed?"
    shared = sorted(set(ours) & set(theirs))
    assert shared, "no package in common with litgpt's requirements: the check would pass on anything"
    for name in shared:
        outside = admitted_only_by_first(ours[name].specifier, theirs[name].specifier)
        assert not outside, (
            f"pyproject.toml: {ours[name]} admits {outside}, which litgpt's {theirs[name]} refuses; "
            f"declare litgpt's range ({theirs[name].specifier}) or one inside it"
        )


def test_installed_litgpt_is_in_the_declared_range():
    assert declared()["litgpt"].specifier.contains(version("litgpt"))


def test_every_pin_in_requirements_txt_satisfies_pyprojects_range():
    ours = declared()
    checked = 0
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = Requirement(line)
        name = canonicalize_name(pin.name)
        (exact,) = pin.specifier
        assert exact.operator == "==", f"requirements.txt: {line} is not a pin (name==version)"
        if name in ours:
            assert ours[name].specifier.contains(exact.version), (
                f"requirements.txt pins {line}; pyproject says {ours[name]}"
            )
            checked += 1
    assert checked >= 5
