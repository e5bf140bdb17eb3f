"""Every example in the README and docs/ runs or parses as written.

- Each fenced TOML or JSON block is read with the loader its tool uses: an
  apply document (it has "vips") as `lbctl apply` reads it, then validated as
  lbd validates it; a backend plan (it has "tunnel_addresses") as
  `xdplb-backend` reads it; an lbd configuration with lbd's own loader.
- Each `lbctl ...`, `lbd ...` or `xdplb-backend ...` command, in a code block or inline, names
  commands and options that exist (metasyntax like `set|del` or `[--wait S]`
  is read as the alternatives it offers).
- Each lbctl command written out in full (no placeholder) runs against a real
  lbd in a namespace lab, in the order the page shows them, and succeeds; the
  README's apply document is applied with `lbctl apply -f` as the page says.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from lbctl.cli import cli as lbctl_cli
from lbctl.cli import read_document
from xdplb import lbd as lbd_module
from xdplb.backendhost.cli import cli as backend_cli
from xdplb.backendhost.plan import read_plan
from xdplb.config import load_config
from xdplb.state import DesiredState

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
SHELL_LANGS = {"sh", "shell", "bash", "console"}
TOOLS: dict[str, click.Command] = {"lbctl": lbctl_cli, "lbd": lbd_module.main,
                                   "xdplb-backend": backend_cli}
# Words that mark a command as a pattern rather than a command to run.
PLACEHOLDER = re.compile(r"[\[\]|$<>]|\.\.\.|\b[A-Z][A-Z_]+\b")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    blocks = []
    text = page.read_text()
    for match in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(page, line, match[1], match[2]))
    return blocks


def all_blocks(*langs: str) -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.lang in langs]


def shell_commands(block: Block) -> list[str]:
    """The block's lines (continuations joined), prompts and comments removed."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def tool_commands() -> list[tuple[str, str]]:
    """(where, command) for each lbctl/lbd command in a shell block or inline code."""
    found = []
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.lang in SHELL_LANGS:
                found += [(str(block), c) for c in shell_commands(block)
                          if c.split()[0] in TOOLS]
        text = page.read_text()
        for match in re.finditer(r"(?<!`)`((?:lbctl|lbd|xdplb-backend) [^`]+)`(?!`)", text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(REPO)}:{line}", match[1]))
    return found


def parsed_example(block: Block) -> object:
    if block.lang == "toml":
        return tomllib.loads(block.text)
    import json
    return json.loads(block.text)


# --- examples parse ------------------------------------------------------------------------


@pytest.mark.parametrize("block", all_blocks("toml", "json"), ids=str)
def test_every_toml_and_json_example_loads_as_its_tool_reads_it(block: Block,
                                                                 tmp_path: Path) -> None:
    data = parsed_example(block)
    assert isinstance(data, dict), f"{block}: an example is a table"
    if "tunnel_addresses" in data:
        path = tmp_path / "backend.toml"
        path.write_text(block.text)
        read_plan(path, {}).validate()
    elif "vips" in data:
        path = tmp_path / f"example.{block.lang}"
        path.write_text(block.text)
        import json
        DesiredState.from_dict(json.loads(read_document(str(path))), "document")
    else:
        assert block.lang == "toml", f"{block}: JSON examples are apply documents"
        path = tmp_path / "lbd.toml"
        path.write_text(block.text)
        load_config(path, {"interfaces": ("eth0",)} if "interfaces" not in data else {})


def test_the_pages_have_examples() -> None:
    assert all_blocks("toml"), "the apply document example is gone"
    assert len(tool_commands()) > 20


# --- commands name what exists -------------------------------------------------------------


def _walk(tool: str, words: list[str]) -> list[click.Command]:
    """The commands a pattern names, following `a|b` alternatives at each level."""
    current: list[click.Command] = [TOOLS[tool]]
    for word in words:
        groups = [c for c in current if isinstance(c, click.Group)]
        if not groups or word.startswith("-"):
            break
        names = word.split("|")
        if not all(n in groups[0].commands for n in names):
            break  # an argument, not a subcommand
        current = [groups[0].commands[n] for n in names]
    return current


def _option_names(commands: list[click.Command], root: click.Command) -> set[str]:
    names = {opt for p in root.params for opt in (*p.opts, *p.secondary_opts)}
    for command in commands:
        names |= {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        names |= {"--help", "-h"}
    return names


@pytest.mark.parametrize(("where", "command"), tool_commands(),
                         ids=[f"{w} {c[:40]}" for w, c in tool_commands()])
def test_every_documented_command_and_option_exists(where: str, command: str) -> None:
    tool, *rest = command.split()
    commands = _walk(tool, [w for w in rest if not w.startswith("[")])
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])", command))
    unknown = options - _option_names(commands, TOOLS[tool])
    assert not unknown, f"{where}: `{command}` uses options that do not exist: {unknown}"
    if tool == "lbctl" and len(rest) and not rest[0].startswith("-"):
        assert commands != [TOOLS[tool]], f"{where}: `{command}` names no lbctl command"


# --- commands run ----------------------------------------------------------------------------


def runnable_lbctl_lines(page: Path) -> list[tuple[str, list[str]]]:
    lines = []
    for block in fenced_blocks(page):
        if block.lang not in SHELL_LANGS:
            continue
        for command in shell_commands(block):
            if command.startswith("lbctl ") and not PLACEHOLDER.search(command):
                lines.append((str(block), shlex.split(command)[1:]))
    return lines


@pytest.fixture(scope="module")
def lab_lbd(tmp_path_factory):
    from tests.lbd_helpers import lab_with_lbd
    from xdplb.datapath import MapSizes

    sizes = MapSizes(max_vips=16, max_backends=64, ring_entries=16 * 65537, conn_entries=4096)
    with lab_with_lbd("xtdocs", tmp_path_factory.mktemp("lbd"), sizes, n_backends=2,
                      http=False) as (_, lbd):
        yield lbd


@pytest.mark.netns
@pytest.mark.parametrize("page", [p for p in PAGES if runnable_lbctl_lines(p)],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_complete_lbctl_command_runs_against_a_real_lbd(lab_lbd, page: Path) -> None:
    from tests.lbd_helpers import running_and_empty

    running_and_empty(lab_lbd)
    for where, args in runnable_lbctl_lines(page):
        result = lab_lbd.lbctl(*args)
        assert result.returncode == 0, f"{where}: lbctl {shlex.join(args)}: {result.stderr}"


def apply_documents() -> list[Block]:
    return [b for b in all_blocks("toml", "json")
            if "vips" in parsed_example(b) and "tunnel_addresses" not in parsed_example(b)]


@pytest.mark.netns
@pytest.mark.parametrize("document", apply_documents(), ids=str)
def test_every_apply_document_shown_applies_with_lbctl(lab_lbd, document: Block) -> None:
    from tests.lbd_helpers import running_and_empty

    running_and_empty(lab_lbd)
    path = lab_lbd.workdir / f"lb.{document.lang}"
    path.write_text(document.text)
    dry = lab_lbd.lbctl("apply", "-f", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    applied = lab_lbd.lbctl("apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == dry.stdout and applied.stdout
    again = lab_lbd.lbctl("apply", "-f", str(path))
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "no change\n")


def test_the_readme_is_short_and_shows_an_apply_document() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert [b for b in fenced_blocks(REPO / "README.md") if b.lang == "toml"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"
