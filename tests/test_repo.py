"""Repository hygiene: the conda environment installs exactly requirements.txt; imports run one way."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (torch_fidelity and torch-fidelity are one)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def requirements(path: Path) -> dict[str, str]:
    """{distribution name (lower case, no extras): lower bound} of a requirements file (its -r lines left out)."""
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, _, bound = line.partition(">=")
            reqs[normalized(name.split("[")[0])] = bound
    return reqs


# Needed at run time without an import of their own: what the named package loads through a plug-in or by name.
NOT_IMPORTED = {
    "torch-fidelity": "its Inception-v3 weights are what torchmetrics' FID loads (evaluation/fid.py)",
    "imageio": "moviepy writes GIFs through it (evaluation/images.py)",
    "scipy": "torchdiffeq and torchmetrics use it; named for its lower bound",
    "ipykernel": "the kernel tests/test_notebook.py runs the notebook in",
    "ruff": "the linter and formatter of the README's test command",
    "matplotlib": "notebooks/sampling.ipynb plots with it",
}


def third_party_imports(paths: list[Path]) -> set[str]:
    """Distribution names (lower case) of every non-project, non-standard-library module the files import."""
    from importlib.metadata import packages_distributions

    dists, own = (
        packages_distributions(),
        {
            "models",
            "data",
            "utils",
            "objectives",
            "sampling",
            "evaluation",
            "training",
            "benchmarks",
            "tests",
            "stand_ins",
        }
        | {p.stem for p in ROOT.glob("*.py")},
    )
    found = set()
    for path in paths:
        for module, _ in imports(path):
            top = module.split(".")[0]
            if top in own or top in sys.stdlib_module_names or top.startswith("test_") or top == "__future__":
                continue
            assert top in dists, f"{path.relative_to(ROOT)} imports {top}, which no installed distribution provides"
            found |= {normalized(d) for d in dists[top]}
    return found


def test_requirements_are_what_the_code_imports():
    runtime = requirements(ROOT / "requirements.txt")
    dev = requirements(ROOT / "requirements-dev.txt")
    assert all(runtime.values()) and all(dev.values()), "every requirement has a lower bound"
    code = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", ".venv")]
    tests = list((ROOT / "tests").glob("*.py"))
    used = third_party_imports(code)
    assert used - set(runtime) == set(), "imported by the project but missing from requirements.txt"
    assert third_party_imports(tests) - set(runtime) - set(dev) == set(), "imported by tests, not in any requirements"
    needed = used | third_party_imports(tests)
    unused = set(runtime) | set(dev)
    unused -= needed | set(NOT_IMPORTED)
    assert unused == set(), f"required but never imported (and not in NOT_IMPORTED): {unused}"
    # the seed's dependencies stay
    seed = "torch torchvision torchcfm timm einops wandb moviepy torchmetrics scipy numpy tqdm torchdiffeq"
    for name in seed.split():
        assert name in runtime, name


def test_code_is_formatted_by_ruff_format():
    """ruff format decides the layout (pyproject.toml's line length); no file is left for it to change."""
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fmt: " + "skip" not in "".join(p.read_text() for p in ROOT.rglob("*.py") if ".venv" not in p.parts)


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
    packages = {"models", "data", "utils", "objectives", "sampling", "evaluation", "training"}
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


LAYERS = {  # package -> the project's packages it may import (besides itself): each only those below it
    "utils": set(),
    "models": {"utils"},
    "data": {"utils", "models"},
    "objectives": {"utils", "models"},
    "sampling": {"utils", "models"},
    "evaluation": {"utils", "models", "data", "sampling"},
    "training": {"utils", "models", "data", "objectives", "sampling", "evaluation"},
}


def test_packages_import_only_the_layers_below_them():
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).glob("*.py")):
            for module, _ in imports(path):
                top = module.split(".")[0]
                if top in LAYERS and top != package:
                    assert top in allowed or module in allowed or any(module.startswith(a + ".") for a in allowed), (
                        f"{path.relative_to(ROOT)} imports {module}"
                    )


SPELLED = {  # objective name -> the files (None: anywhere in them) and lines that may spell it
    "meanflow": {
        "objectives/meanflow.py": None,  # its own file
        "objectives/imf.py": None,  # improved MeanFlow builds on MeanFlow's JVP helpers, imported by name
        "objectives/__init__.py": re.compile(
            r'^(from objectives\.meanflow import MeanFlow|    "meanflow": MeanFlow,.*)$'
        ),
        "training/config.py": re.compile(
            r'^    "digits-meanflow": DIGITS \| dict\(objective="meanflow", out="runs/digits-meanflow"\),$'
        ),
        "benchmarks/gpu_check.py": None,  # a part of the GPU check measures that objective by name, like a preset
        "benchmarks/gpu_summary.py": None,  # and its summary reports that part's numbers by name
        "benchmarks/convergence.py": None,  # trains the best recipe once with that objective, by its preset
    },
    "imf": {
        "objectives/imf.py": None,  # its own file
        "objectives/__init__.py": re.compile(
            r'^(from objectives\.imf import ImprovedMeanFlow|    "imf": ImprovedMeanFlow,.*)$'
        ),
        "training/config.py": re.compile(
            r'^    "digits-imf": DIGITS$|^    \| dict\((objective="imf", .*|imf_\w+=.*)\),?$'
        ),
    },
}


@pytest.mark.parametrize("name", sorted(SPELLED))
def test_no_module_outside_the_objective_spells_its_name(name):
    """What a new objective needs is asked of the objective (network_options, sample_method), so its name is
    spelled only in its own file, its registry line and the presets; likewise the datasets'."""
    allowed = SPELLED[name]
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".venv/")) or allowed.get(rel, False) is None:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if name in line:
                pattern = allowed.get(rel)
                assert pattern is not None and pattern.match(line), f"{rel}:{number}: {line.strip()}"
