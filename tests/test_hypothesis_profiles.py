"""No property test depends on the machine's speed: no hypothesis profile and no @settings in tests/ sets a deadline."""

import ast

from hypothesis import settings

from helpers import ROOT


def test_every_registered_profile_has_no_deadline():
    profiles = settings._profiles  # hypothesis keeps no public list of the registered names
    assert {"default", "ci", "explore", "fast"} <= set(profiles)
    with_deadline = {name: str(profile.deadline) for name, profile in profiles.items() if profile.deadline is not None}
    assert not with_deadline, f"profiles with a deadline (register them with deadline=None): {with_deadline}"
    assert settings().deadline is None


def test_no_settings_call_in_tests_sets_a_deadline():
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "deadline" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is None
                    ):
                        found.append(f"{path.name}:{node.lineno}")
    assert not found, f"deadline set to something other than None at {found}"
