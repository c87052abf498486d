import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import yaml
from conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_names = {_name(r) for r in pip_section if not r.startswith("-")}
    assert env_names == {_name(r) for r in deps}
    assert any(r.startswith("-e .") for r in pip_section), "environment.yml must install ctxseg itself"


def test_constraints_pin_the_versions_environment_yml_uses():
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    env = (ROOT / "environment.yml").read_text()
    for name, version in pins.items():
        assert f"{name}=={version}" in env


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make demo" in head and "make test" in head
