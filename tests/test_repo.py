"""Repository hygiene: the conda environment installs exactly requirements.txt; imports run one way."""

import ast
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


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) for every import statement of a python file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def test_imports_run_one_way_scripts_import_packages_never_the_reverse():
    scripts = {p.stem for p in ROOT.glob("*.py")}  # train, sampler, evaluate
    packages = {"models", "data", "utils", "objectives", "sampling", "evaluation"}
    assert {"train", "sampler", "evaluate"} <= scripts
    for folder in sorted(packages):
        for path in sorted((ROOT / folder).glob("*.py")):
            for module, module_level in imports(path):
                top = module.split(".")[0]
                assert top not in scripts | {"benchmarks", "tests"}, f"{path.relative_to(ROOT)} imports {module}"
                # an import of the project's own code inside a function would only hide a cycle
                assert module_level or top not in packages, f"{path.relative_to(ROOT)} imports {module} in a function"
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for module, _ in imports(path):
            assert module.split(".")[0] not in scripts, f"{path.relative_to(ROOT)} imports the script {module}"
