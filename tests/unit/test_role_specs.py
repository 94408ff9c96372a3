"""Every role documents exactly the variables it defaults, with the same values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def test_roles_exist():
    assert "node_base" in ROLES
    assert "farm" in ROLES


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role: str):
    defaults = load(REPO / "roles" / role / "defaults" / "main.yml")
    options = load(REPO / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults), "argument_specs and defaults/main.yml list different variables"
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: {name} has no description"
        assert "type" in spec, f"{role}: {name} has no type"
        assert spec.get("default") == defaults[name], f"{role}: {name} default differs from defaults/main.yml"


@pytest.mark.parametrize("role", ROLES)
def test_public_variables_carry_the_role_prefix(role: str):
    defaults = load(REPO / "roles" / role / "defaults" / "main.yml")
    assert all(name.startswith(f"{role}_") for name in defaults)
    vars_file = REPO / "roles" / role / "vars" / "main.yml"
    internals = load(vars_file) if vars_file.exists() else {}
    assert all(name.startswith(f"__{role}_") for name in internals)


@pytest.mark.parametrize("role", ROLES)
def test_templates_start_with_ansible_managed(role: str):
    for template in (REPO / "roles" / role / "templates").glob("*.j2"):
        assert template.read_text().startswith("{{ ansible_managed | comment }}"), template.name
