"""The README and the docs/ pages as a reader meets them: the README fits a front page, every relative link leads to a
file (and heading) that exists, every command of a bash block that runs one of the repo's scripts parses with that
script's own parser, and the short commands run as written."""

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", ";", ";;", "|", "&"}
WRAPPERS = {"time", "exec", "srun", "nohup"}  # run the command that follows them
# Shell variables in a script's command, and the real value each stands for here (none today: add one with its use).
VARIABLES: dict[str, str] = {"recipe": "lightning", "run": "flow-lightning-s0"}
PACKAGES = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def bash_blocks(page: Path) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == "bash"]


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell text (continued lines joined, comments dropped), each as its words."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word not in SEPARATORS:
                words.append(word)
                continue
            while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in WRAPPERS):
                words.pop(0)  # VAR=value prefixes, time / exec / srun
            if words[:2] == ["bash", "-c"] and len(words) > 2:
                commands += shell_commands(words[2])
            elif words:
                commands.append(words)
            words = []
    return commands


def script_of(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) when words run a Python script (a .py path) or a module of one of this repo's packages;
    None for anything else (pytest, venv, pip, ruff). A script or module that does not exist fails to parse."""
    if Path(words[0]).name in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            module, args = words[2], words[3:]
            return (module, args) if module.split(".")[0] in PACKAGES else None
        at = 1
    elif words[0] == "torchrun":
        at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if at is None:
            return None
    else:
        return None
    return words[at].removesuffix(".py").replace("/", "."), words[at + 1 :]


def documented_commands() -> list[tuple[str, str, list[str], list[str]]]:
    """(page, module, arguments, the command's words) of every command in a bash block that runs one of the repo's
    scripts."""
    found = []
    for page in PAGES:
        for block in bash_blocks(page):
            for words in shell_commands(block):
                if (hit := script_of(words)) is not None:
                    found.append((page_id(page), *hit, words))
    return found


COMMANDS = documented_commands()


def short_commands() -> list[list[str]]:
    """The rule for a short command: a python command whose last argument is --help (it prints its usage and exits
    0 within seconds); of several for one script, the first in page order. The others train, sample, download or
    measure, so they only parse (a --help among them too, in-process)."""
    short: dict[str, list[str]] = {}
    for _, module, _, words in COMMANDS:
        if words[0] != "torchrun" and words[-1] == "--help":
            short.setdefault(module, words)
    return list(short.values())


class Parsed(Exception):
    """Raised in place of running a script once its arguments have parsed."""


def parse_only(module_name: str, args: list[str]) -> None:
    """Feed args to the script's own parser without running it: its ``parse_args(argv)`` where it has one (the
    config's checks included); otherwise its ``cli``/``main(argv)`` stopped right after argparse has parsed."""
    module = importlib.import_module(module_name)
    if hasattr(module, "parse_args"):
        module.parse_args(args)
        return
    entry = getattr(module, "cli", None) or module.main
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with contextlib.suppress(Parsed):
            entry(args)


def substitute(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        for name, value in VARIABLES.items():
            arg = arg.replace("$" + name, value)
        assert "$" not in arg, f"shell variable in {arg!r}: give it a value in VARIABLES"
        out.append(arg)
    return out


# ----------------------------------------------------------------------------------------- pages and links


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move reference material to docs/"


def slugs(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings (outside code blocks)."""
    text = FENCE.sub("", page.read_text())
    seen: Counter[str] = Counter()
    out = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    links = []
    for page in PAGES:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # no code: NORMS[name](dim) is no link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            links.append((page, target, (page.parent / path).resolve() if path else page, anchor))
    assert len(links) > 20  # the README links every docs/ page
    broken = [f"{page_id(p)}: {t}" for p, t, f, _ in links if not f.exists()]
    broken += [f"{page_id(p)}: {t} (no such heading)" for p, t, f, a in links if a and f.exists() and a not in slugs(f)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [page_id(p) for p in PAGES[1:] if f"]({page_id(p)})" not in readme] == []


# ----------------------------------------------------------------------------------------- commands


def test_the_commands_are_found():
    """The extraction itself: the README's set-up and quick start, the Slurm script's srun line and torchrun."""
    found = [(page, module, args) for page, module, args, _ in COMMANDS]
    assert ("README.md", "train", []) in found  # the set-up line: ... && python train.py
    assert ("README.md", "train", ["--preset", "digits-quick"]) in found
    assert ("docs/reliability.md", "train", ["--out", "runs/cifar10", "--batch-size", "1024", "--resume", "auto"]) in (
        found
    )
    assert any(m == "extract_latents" for _, m, _ in found) and len(found) > 30
    words = [["python", "-m", "x", "--n", "2"], ["ruff", "check", "."]]
    assert shell_commands("A=1 time python -m x --n 2 && ruff check .  # c") == words


def test_every_documented_command_parses():
    failed = []
    for page, module, args, words in COMMANDS:
        err, command = io.StringIO(), f"{page}: {shlex.join(words)}"
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                parse_only(module, substitute(args))
        except SystemExit as e:
            if e.code not in (0, None):
                failed.append(f"{command}\n    {(err.getvalue().strip().splitlines() or [''])[-1]}")
        except Exception as e:  # a value out of range (ConfigError), a script that does not exist
            failed.append(f"{command}\n    {type(e).__name__}: {e}")
    assert not failed, "commands that do not parse:\n" + "\n".join(failed)


def test_a_command_that_does_not_parse_is_caught():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        parse_only("train", ["--no-such-flag"])
    assert e.value.code == 2
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse_only("benchmarks.few_step", ["--methods", "euler:1"])  # --ckpt is required


def test_the_short_commands_run_as_written():
    """Each as a process of its own, all at once, with this interpreter as python."""
    short = short_commands()
    assert len(short) >= 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [(words, subprocess.Popen([sys.executable, *words[1:]], cwd=ROOT, env=env, **pipes)) for words in short]
    for words, process in runs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0 and "usage:" in out, f"{shlex.join(words)}: exit {process.returncode}\n{err}"
