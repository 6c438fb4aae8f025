"""Docs that cannot drift (issue #19): every ``python -m gptjax.<tool>`` / ``gptjax-<tool>`` command in the
README and docs/ parses with that tool's own argument parser (nothing runs), and every relative link in them
points to a file (and heading) that exists.

A tool is found by name: ``python -m gptjax.<tool>`` runs ``gptjax/<tool>.py``, which runs ``gptjax.cli.<tool>``;
that module is imported with importlib and its parser built by ``build_parser()``, so a new CLI module is
covered as soon as a page shows it. A ``gptjax-<tool>`` console script is looked up in
pyproject.toml's ``[project.scripts]``. A literal ``...`` in a command stands for flags left out and is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUILDER = "build_parser"
# Fenced blocks in these languages hold code or data, not shell commands.
NOT_SHELL = {"python", "py", "pycon", "ipython", "json", "jsonl", "toml", "yaml", "yml", "ini", "diff"}
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", "|&", ";;"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
CONSOLE_SCRIPT = re.compile(r"gptjax-[\w-]+")


@dataclass(frozen=True)
class Command:
    where: str  # "docs/training.md:12"
    text: str  # the command as the page shows it, continuations joined
    module: str | None  # "gptjax.train"; None for a console script pyproject.toml does not declare
    args: tuple[str, ...]
    name: str  # how the page invokes it: "python -m gptjax.train" or "gptjax-train"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def console_scripts() -> dict[str, str]:
    """``gptjax-train`` -> ``gptjax.cli.train``, from pyproject.toml."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    return {name: target.split(":")[0] for name, target in scripts.items()}


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, logical line) of every fenced shell block, backslash continuations joined."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    shell = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, shell = m.group(1), m.group(2).lower() not in NOT_SHELL
            continue
        if stripped.startswith(fence) and not stripped[len(fence):].strip():
            fence = None
            continue
        if not shell:
            continue
        start, body = pending if pending else (number, "")
        body += line
        if body.endswith("\\"):
            pending = (start, body[:-1] + " ")
            continue
        pending = None
        out.append((start, " ".join(body.split())))
    return out


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: comments dropped, split at pipes, &&, ||, ; and &, redirections and
    leading environment assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            commands.append([])
        elif set(token) <= set("<>&") and set(token) & set("<>"):  # a redirection and its target
            if commands[-1] and commands[-1][-1].isdigit():  # the file descriptor before 2>
                commands[-1].pop()
            i += 1
        else:
            commands[-1].append(token)
        i += 1
    out = []
    for words in commands:
        while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in ("env", "time", "exec")):
            words = words[1:]
        if words:
            out.append(words)
    return out


def as_gptjax_command(words: list[str], scripts: dict[str, str]) -> tuple[str | None, list[str], str] | None:
    """(module, arguments, how it was named) when ``words`` runs a gptjax tool, else None."""
    program = words[0].rsplit("/", 1)[-1]  # .venv/bin/python, /usr/bin/python3
    if PYTHON.fullmatch(program):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter options such as -u
            rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "-m" and (rest[1] == "gptjax" or rest[1].startswith("gptjax.")):
            return rest[1], rest[2:], f"python -m {rest[1]}"
        return None
    if CONSOLE_SCRIPT.fullmatch(program):
        return scripts.get(program), words[1:], program
    return None


def collect_commands(path: Path, scripts: dict[str, str] | None = None) -> list[Command]:
    scripts = console_scripts() if scripts is None else scripts
    found = []
    for number, line in shell_lines(path.read_text()):
        for words in split_commands(line):
            hit = as_gptjax_command(words, scripts)
            if hit:
                module, args, name = hit
                args = [a for a in args if a != "..."]
                found.append(Command(f"{rel(path)}:{number}", line, module, tuple(args), name))
    return found


def tool_module(module: str) -> str | None:
    """The module that builds a command's parser: ``python -m gptjax.train`` runs gptjax/train.py, which runs
    gptjax.cli.train (console scripts name gptjax.cli.* directly); None when there is no such module."""
    if module.startswith("gptjax.cli."):
        return module if (ROOT / (module.replace(".", "/") + ".py")).is_file() else None
    tool = module.removeprefix("gptjax.")
    shim, code = ROOT / "gptjax" / f"{tool}.py", ROOT / "gptjax" / "cli" / f"{tool}.py"
    return f"gptjax.cli.{tool}" if "." not in tool and shim.is_file() and code.is_file() else None


class ParseError(Exception):
    pass


def parse_error(command: Command) -> str | None:
    """Why ``command`` does not parse with its tool's own parser, or None when it does."""
    if command.module is None:
        return f"{command.name} is not a console script of pyproject.toml's [project.scripts]"
    target = tool_module(command.module)
    if target is None:
        return f"{command.name}: there is no module {command.module}"
    module = importlib.import_module(target)
    builder = getattr(module, BUILDER, None)
    if builder is None:
        return f"{command.module} has no {BUILDER}() to build its argument parser"
    parser: argparse.ArgumentParser = builder()

    def error(message: str) -> None:
        raise ParseError(f"{parser.prog}: error: {message}")

    def exit(status: int = 0, message: str | None = None) -> None:
        raise ParseError(f"{parser.prog} exits ({status}) while parsing: {message or ''}".strip())

    parser.error, parser.exit = error, exit  # argparse would print and sys.exit; keep the message instead
    try:
        parser.parse_args(list(command.args))
    except ParseError as e:
        return str(e)
    return None


ALL_COMMANDS = [c for page in PAGES for c in collect_commands(page)]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.where)
def test_command_parses(command: Command):
    error = parse_error(command)
    assert error is None, f"{command}\n  {error}"


def test_every_page_command_was_found():
    # The collector reads what the pages show: the README's main job, and each tool the README's pages name.
    names = {c.module for c in ALL_COMMANDS}
    assert {"gptjax.train", "gptjax.generate", "gptjax.convert", "gptjax.download", "gptjax.evaluate",
            "gptjax.aot"} <= names, names
    assert any(c.where.startswith("README.md:") and c.module == "gptjax.train" for c in ALL_COMMANDS)
    # Continuations: the multi-line train command in docs/training.md arrives whole.
    assert any("--grad-accum" in c.args and "--save-every" in c.args for c in ALL_COMMANDS)


def test_collector_and_checker_catch_drift(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "Prose `python -m gptjax.train --inline` is not a command.\n"
        "```bash\n"
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m gptjax.train --epochs 2  # a note\n"
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.train --mesh data=4,fsdp=2 \\\n"
        "    --max-steps 5 2>&1 | tee log.txt\n"
        "gptjax-generate --weights runs/a --prompt 'Every effort # not a comment' --no-such-flag\n"
        "python -m gptjax.no_such_tool --x 1\n"
        "gptjax-no-such-script\n"
        "python -m gptjax.train --epochs many ...\n"
        "```\n"
        "```python\n"
        "python -m gptjax.train --in-python-block\n"
        "```\n"
    )
    commands = collect_commands(page, {"gptjax-generate": "gptjax.generate"})
    # ROOT-relative names do not apply to a temporary file: compare line numbers and arguments.
    assert [(c.module, c.args) for c in commands] == [
        ("gptjax.train", ("--epochs", "2")),
        ("gptjax.train", ("--mesh", "data=4,fsdp=2", "--max-steps", "5")),
        ("gptjax.generate", ("--weights", "runs/a", "--prompt", "Every effort # not a comment", "--no-such-flag")),
        ("gptjax.no_such_tool", ("--x", "1")),
        (None, ()),
        ("gptjax.train", ("--epochs", "many")),
    ]
    assert [c.where.rsplit(":", 1)[1] for c in commands] == ["3", "4", "6", "7", "8", "9"]
    errors = [parse_error(c) for c in commands]
    assert errors[:2] == [None, None]
    assert "unrecognized arguments: --no-such-flag" in errors[2]
    assert "no module gptjax.no_such_tool" in errors[3]
    assert "gptjax-no-such-script is not a console script" in errors[4]
    assert "--epochs" in errors[5] and "'many'" in errors[5]


# ---------------------------------------------------------------------------------------------
# Links


LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, inline code spans blanked out unless not ``blank_code``."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            out.append((number, re.sub(r"(`+)(?:(?!\1).)+?\1", "``", line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(), blank_code=False):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in prose_lines(path.read_text()):
        targets = [m.group(1) for m in LINK.finditer(line)]
        m = REFERENCE.match(line)
        if m:
            targets.append(m.group(1))
        links += [(number, t) for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]
    return links


def link_error(page: Path, target: str, root: Path = ROOT) -> str | None:
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"{file_part} does not exist (looked for {dest})"
    if not dest.is_relative_to(root):
        return f"{file_part} is outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{rel(dest)} has no heading with the anchor #{anchor}; its anchors: {sorted(anchors(dest))}"
    return None


ALL_LINKS = [(page, number, target) for page in PAGES for number, target in relative_links(page)]


@pytest.mark.parametrize("page,number,target", ALL_LINKS, ids=[f"{rel(p)}:{n}:{t}" for p, n, t in ALL_LINKS])
def test_relative_link_resolves(page: Path, number: int, target: str):
    error = link_error(page, target)
    assert error is None, f"{rel(page)}:{number}: ({target}) {error}"


def test_link_checker_catches_broken_links(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Will it fit? Compile for a `TPU`\n\n## Usage\n\n## Usage\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](../other.md#will-it-fit-compile-for-a-tpu) [second](../other.md#usage-1) [web](https://x.org/a)\n"
        "`[in code](missing.md)` [gone](../missing.md) [bad anchor](../other.md#nope) [self](#top)\n"
        "```\n[in a block](missing.md)\n```\n"
        "# Top\n"
    )
    links = relative_links(page)
    assert [t for _, t in links] == ["../other.md#will-it-fit-compile-for-a-tpu", "../other.md#usage-1",
                                     "../missing.md", "../other.md#nope", "#top"]
    errors = [link_error(page, t, tmp_path) for _, t in links]
    assert errors[0] is None and errors[1] is None and errors[4] is None
    assert "does not exist" in errors[2]
    assert "no heading with the anchor #nope" in errors[3]


def test_readme_links_every_page():
    # The README is the front door: each docs page has its line in the README's task list.
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in relative_links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in readme_targets, f"README.md does not link {rel(page)}: add it to its Tasks list"


def test_run_folders_are_made_before_they_are_read():
    # Read in the README's order (the README, then its pages as it lists them), every run folder a command
    # reads (--weights/--resume/--init-from runs/X) was made by an earlier command's --out runs/X.
    order = [ROOT / "README.md"]
    for _, target in relative_links(ROOT / "README.md"):
        dest = (ROOT / target.partition("#")[0]).resolve()
        if dest.parent == (ROOT / "docs").resolve() and dest not in order:
            order.append(dest)
    made: set[str] = set()
    for page in order:
        for command in collect_commands(page):
            args = command.args
            for flag, value in zip(args, args[1:]):
                if flag in ("--weights", "--resume", "--init-from") and value.startswith("runs/"):
                    assert value.rstrip("/") in made, f"{command}: {value} is read before any --out {value}"
                if flag == "--out":
                    made.add(value.rstrip("/"))
