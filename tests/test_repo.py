"""Repository hygiene: the conda environment installs exactly requirements.txt."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pip_section(environment_yml: str) -> list[str]:
    """Entries of the `- pip:` list in environment.yml (a two-level YAML list, parsed by indentation)."""
    lines = environment_yml.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    entries = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        if line.strip().startswith("- "):
            entries.append(line.strip()[2:].strip())
    return entries


def test_environment_yml_installs_requirements_txt():
    env = (ROOT / "environment.yml").read_text()
    assert "name: dit" in env and "python=3.11" in env
    assert pip_section(env) == ["-r requirements.txt"]  # one source of truth for the packages


def test_requirements_name_every_runtime_dependency_with_a_lower_bound():
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, bound = line.partition(">=")
            reqs[name.split("[")[0].strip().lower()] = bound
    needed = (
        "torch torchvision torchcfm timm einops wandb moviepy torchmetrics torch-fidelity scipy numpy tqdm torchdiffeq"
    )
    for name in needed.split():
        assert reqs.get(name), f"{name} missing from requirements.txt or without a lower bound"


def test_dev_requirements_add_pytest_on_top_of_runtime():
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and "pytest" in dev
