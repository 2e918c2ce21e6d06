"""requirements.lock pins every dependency pyproject.toml declares (dev extra included), at a version that
pyproject.toml allows, so a fresh install resolves the same way on every machine."""

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_lock_pins_every_declared_dependency_at_an_allowed_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = locked()
    problems = []
    for r in declared:
        pin = pins.get(canonicalize_name(r.name))
        if pin is None or not r.specifier.contains(pin, prereleases=True):
            problems.append(f"{r.name}: {pin or 'not in the lock'} vs {r.specifier or 'any version'}")
    assert not problems, "run `bash scripts/lock.sh`: " + "; ".join(problems)
