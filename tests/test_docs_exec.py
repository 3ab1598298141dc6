"""The documentation's examples run: every shell and Python block of README.md and docs/*.md.

A doc example that drifts from the tool (a renamed option, a wrong task name, a recipe that no
longer fits its data) fails here. docs/cli.md and docs/recipes.md are generated from the code
and checked by tests/test_docs.py, so they are left out.

Which blocks
    Fences tagged ``bash``, ``sh``, ``shell`` or ``console`` (only its ``$ `` lines) run as
    shell; ``python`` or ``py`` run with ``python``; ``toml`` blocks (recipes) must either be
    written to a file (``file:``) or skipped with a reason. Other blocks (``text``, untagged)
    show output or layouts and are not run, but one that holds a ``branchnas`` command line
    must be tagged, so that no command escapes this test.

Markers
    HTML comments, invisible on the rendered page, on the lines directly above a block's
    opening fence::

        <!-- not run: REASON -->   not run; REASON (required) says why: it installs packages,
                                   needs files a reader has and CI has not, is an API outline
        <!-- file: NAME -->        not run: written to NAME in the page's folder (a recipe that
                                   the next commands read)
        <!-- continues -->         a Python block that goes on from the Python block just before
                                   it: they run as one script, in one process
        <!-- before: COMMAND -->   a shell command run first, to provide what a reader would
                                   have (a photo to open); not part of the example

How
    Each page runs top to bottom in its own folder: shell blocks with ``bash`` (``set -e``, so
    every line must succeed), Python blocks with ``python``, each script laid out so that its
    line numbers are the page's (``pytest -s`` prints how long each one took). The folder
    starts with a copy of one tiny run of the default recipe (``runs/shapes``, made once per
    session by ``branchnas run``), so the pages that begin with ``branchnas run`` or
    ``branchnas export`` do not train it again; every command still runs, and any other recipe
    or value trains anew. ``branchnas`` on the PATH is this file run as a script (``shim``): it
    runs the real command line with tiny settings appended, so that a page takes seconds:

    * ``pretrain.epochs`` and ``finetune.epochs`` at most 1, on the CPU;
    * generated data (no ``data.root``: shapes, digits): 64 training, 32 validation and 32 test
      images, and ``affinity.images`` 16 when the split it reads was shrunk below it, but only
      when the recipe's own K fits its own split (so a recipe whose K is too large still fails);
    * the encoder, its width, the tasks and the image size are kept, so sizes and budgets are
      the ones a reader sees.

    The settings are appended after the page's own and only ever lower a number. A command that
    gives a budget (``--budget``, ``--set search.budget=``) at or above the all-separate tree
    fails too: every tree fits such a budget, so the example shows no choice.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = {"cli.md", "recipes.md"}
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
RECIPE = {"toml"}
MARKERS = ("not run", "file", "continues", "before")

#: the tiny settings (see the module docstring)
TINY_EPOCHS = 1
TINY_SPLITS = {"train": 64, "val": 32, "test": 32}
TINY_AFFINITY_IMAGES = 16
STEP_TIMEOUT = 600

_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)")
_COMMENT = re.compile(r"^\s*<!--(.*?)-->\s*$")
_COMMAND_LINE = re.compile(r"^\s*(?:\$\s+)?branchnas(?:\s|$)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


# --------------------------------------------------------------------------- the pages


@dataclass
class Block:
    page: Path
    line: int  # 1-based line number of the opening fence
    lang: str
    lines: list[str]
    markers: dict[str, str]

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"

    @property
    def kind(self) -> str | None:
        """shell, python or recipe: a block this test runs or accounts for; None: output, text."""
        for kind, langs in (("shell", SHELL), ("python", PYTHON), ("recipe", RECIPE)):
            if self.lang in langs:
                return kind
        return None

    @property
    def action(self) -> str:
        """skip, file, run, or ignore (not a code block)."""
        if "not run" in self.markers:
            return "skip"
        if "file" in self.markers:
            return "file"
        return "run" if self.kind in ("shell", "python") else "ignore"

    @property
    def code(self) -> str:
        return "\n".join(self.lines) + "\n"


def _marker(text: str) -> tuple[str, str] | None:
    """``(key, value)`` of a marker comment's text, or None when it is no marker."""
    for key in MARKERS:
        if text == key or text.startswith(key + ":"):
            return key, text[len(key) + 1:].strip()
    return None


def parse(page: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown page with their markers, and the problems found."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    attached: set[int] = set()
    fenced: set[int] = set()
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        fenced.update(range(i, end + 1))
        markers: dict[str, str] = {}
        above = i - 1
        while above >= 0 and (comment := _COMMENT.match(lines[above])):
            attached.add(above)
            text_ = comment.group(1).strip()
            found = _marker(text_)
            where = f"{_rel(page)}:{above + 1}"
            if found is None:
                problems.append(f"{where}: unknown marker <!-- {text_} --> above a block; "
                                f"markers: {', '.join(MARKERS)}")
            elif found[0] in markers:
                problems.append(f"{where}: marker '{found[0]}' given twice for one block")
            else:
                markers[found[0]] = found[1]
            above -= 1
        blocks.append(Block(page, i + 1, lang, lines[i + 1:end], markers))
        i = end + 1
    for n, line in enumerate(lines):
        comment = _COMMENT.match(line)
        if comment and n not in attached and n not in fenced and _marker(comment.group(1).strip()):
            problems.append(f"{_rel(page)}:{n + 1}: marker {line.strip()} is not directly above a code block")
    return blocks, problems + _check(blocks)


def _check(blocks: list[Block]) -> list[str]:
    """What is wrong with the markers of a page's blocks."""
    problems = []
    previous: Block | None = None  # the previous block that is run or written
    for block in blocks:
        where, markers = block.where, block.markers
        if "not run" in markers and not markers["not run"]:
            problems.append(f"{where}: <!-- not run: REASON --> needs a reason")
        if "not run" in markers and len(markers) > 1:
            problems.append(f"{where}: a block that is not run takes no other marker")
        if "file" in markers:
            name = markers["file"]
            if not name or Path(name).is_absolute() or ".." in Path(name).parts:
                problems.append(f"{where}: <!-- file: NAME --> needs a file name inside the page's folder")
            if {"continues", "before"} & set(markers):
                problems.append(f"{where}: a block written to a file is not run; drop continues/before")
        if block.kind == "recipe" and not {"file", "not run"} & set(markers):
            problems.append(f"{where}: a ```{block.lang} block must be written to a file "
                            f"(<!-- file: NAME -->) or skipped (<!-- not run: REASON -->)")
        if block.kind is None and block.action == "ignore" and markers:
            problems.append(f"{where}: markers on a ```{block.lang or '(untagged)'} block, which is never run")
        if block.kind is None and any(_COMMAND_LINE.match(line) for line in block.lines):
            problems.append(f"{where}: a ```{block.lang or '(untagged)'} block holds a branchnas command line; "
                            f"tag it ```bash to run it (or mark it not run), or show it as output another way")
        if "before" in markers and not markers["before"]:
            problems.append(f"{where}: <!-- before: COMMAND --> needs a command")
        if "continues" in markers:
            if markers["continues"]:
                problems.append(f"{where}: <!-- continues --> takes no value")
            if block.kind != "python":
                problems.append(f"{where}: only a Python block can continue another")
            elif previous is None or previous.kind != "python" or previous.action != "run":
                problems.append(f"{where}: <!-- continues --> but the block run just before it is not Python")
        if block.action in ("run", "file"):
            previous = block
    return problems


def _page_id(page: Path) -> str:
    return _rel(page)


def _runs_something(page: Path) -> bool:
    return any(b.action == "run" for b in parse(page)[0])


# --------------------------------------------------------------------------- fast checks


def test_parse_reads_blocks_and_markers():
    page = ROOT / "docs" / "example.md"
    text = ("# A page\n\n<!-- not run: installs packages -->\n```bash\npip install x\n```\n\n"
            "<!-- file: r.toml -->\n```toml\nname = \"r\"\n```\n\n```python\nx = 1\n```\n"
            "<!-- continues -->\n<!-- before: touch photo.png -->\n````python\nprint(x)\n```\n````\n"
            "```text\noutput\n```\n")
    blocks, problems = parse(page, text)
    assert problems == []
    assert [(b.line, b.lang, b.action) for b in blocks] == [
        (4, "bash", "skip"), (9, "toml", "file"), (13, "python", "run"), (18, "python", "run"), (22, "text", "ignore")]
    assert blocks[0].markers == {"not run": "installs packages"}
    assert blocks[3].markers == {"continues": "", "before": "touch photo.png"}
    assert blocks[3].lines == ["print(x)", "```"]


def test_parse_reports_bad_markers():
    page = ROOT / "docs" / "example.md"
    text = ("<!-- not run: -->\n```bash\nx\n```\n<!-- not run:reason -->\n\n```sh\ny\n```\n"
            "```toml\na = 1\n```\n<!-- continues -->\n```python\nz\n```\n<!-- notrun: typo -->\n```bash\nq\n```\n"
            "```text\n$ branchnas run\n```\n")
    _, problems = parse(page, text)
    expected = [(":2:", "needs a reason"), (":5:", "not directly above"), (":10:", "written to a file"),
                (":14:", "not Python"), (":17:", "unknown marker"), (":21:", "command line")]
    for where, what in expected:
        assert any(where in p and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_block_is_run_or_marked(page):
    """Each shell, Python and recipe block is run, written or skipped with a reason."""
    blocks, problems = parse(page)
    assert not problems, "\n".join(problems)
    for block in blocks:
        if block.action == "skip":
            assert block.markers["not run"].strip(), f"{block.where}: not run without a reason"


def test_the_docs_run_examples():
    runnable = [p for p in PAGES if _runs_something(p)]
    assert {"README.md", "docs/quickstart.md", "docs/custom-data.md", "docs/exported-model.md"} <= {
        _rel(p) for p in runnable}


def test_tiny_settings_only_lower_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = _tiny_sets(["run", "--set", "pretrain.epochs=3"])
    assert sets[1::2] == ["pretrain.epochs=1", "pretrain.device=cpu", "finetune.epochs=1", "finetune.device=cpu",
                          "data.num_train=64", "data.num_val=32", "data.num_test=32", "affinity.images=16"]
    assert _tiny_sets(["--help"]) == _tiny_sets(["datasets"]) == _tiny_sets(["run", "--help"]) == []
    # A K too large for the recipe's own split is kept, so that the command fails as written.
    too_many = _tiny_sets(["search", "--set", "data.num_val=100", "--set", "affinity.images=200", "--budget", "1M"])
    assert "data.num_val=32" in too_many and not any(s.startswith("affinity.images") for s in too_many)
    (tmp_path / "mine.toml").write_text('[data]\ndataset = "arrays"\nroot = "x.npz"\n[pretrain]\nepochs = 1\n')
    assert _tiny_sets(["-q", "run", "mine.toml"])[1::2] == ["pretrain.device=cpu", "finetune.epochs=1",
                                                            "finetune.device=cpu"]


def test_a_budget_that_every_tree_fits_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "runs" / "shapes" / "search" / "tree.json"
    tree.parent.mkdir(parents=True)
    tree.write_text(json.dumps({"metric": "flops", "budget": 500e6, "min_size": 51e6, "max_size": 294e6}))
    assert "at or above the largest tree" in _budget_problem(["search", "--budget", "500M", "--metric", "flops"])
    assert _budget_problem(["run", "--set", "search.budget=500M"]) is not None
    assert _budget_problem(["run"]) is None  # the recipe's own budget is not an example's
    tree.write_text(json.dumps({"metric": "flops", "budget": 150e6, "min_size": 51e6, "max_size": 294e6}))
    assert _budget_problem(["search", "--budget", "150M", "--metric", "flops"]) is None


# --------------------------------------------------------------------------- running a page


def _environment(tmp_path: Path) -> dict[str, str]:
    """PATH with ``branchnas`` (the shim) and ``python`` (this interpreter) first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = shlex.quote(sys.executable)
    scripts = {"branchnas": f"exec {python} {shlex.quote(str(Path(__file__).resolve()))} \"$@\"",
               "python": f"exec {python} \"$@\"", "python3": f"exec {python} \"$@\""}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _laid_out(blocks: list[Block], first_line: str = "", console: bool = False) -> str:
    """One script of the blocks, each code line on its line number in the page."""
    last = max(b.line + len(b.lines) for b in blocks)
    lines = [""] * last
    lines[blocks[0].line - 1] = first_line
    for block in blocks:
        for offset, line in enumerate(block.lines):
            if console:
                line = line[2:] if line.startswith("$ ") else ""
            lines[block.line + offset] = line
    return "\n".join(lines) + "\n"


def _step(what: str, args: list[str], work: Path, env: dict[str, str], blocks: Sequence[Block] = ()) -> None:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=STEP_TIMEOUT)
    print(f"{time.perf_counter() - start:5.1f} s  {what}")  # shown with pytest -s
    if result.returncode != 0:
        shown = "\n".join(f"{b.where}:\n```{b.lang}\n{b.code}```" for b in blocks)
        tail = "\n".join(result.stdout.splitlines()[-60:])
        pytest.fail(f"{what} failed (exit status {result.returncode}):\n{shown}\noutput (last lines):\n{tail}",
                    pytrace=False)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """``runs/`` of a tiny ``branchnas run`` of the default recipe, made through the shim."""
    folder = tmp_path_factory.mktemp("default-run")
    work = folder / "work"
    work.mkdir()
    env = _environment(folder)
    _step("`branchnas run` of the default recipe (the run every page starts with)",
          [str(folder / "bin" / "branchnas"), "run"], work, env)
    return work / "runs"


def run_page(page: Path, tmp_path: Path, runs: Path | None = None) -> None:
    """Run the page's blocks in order in a fresh folder, holding a copy of ``runs`` if given."""
    blocks, problems = parse(page)
    assert not problems, "\n".join(problems)
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    if runs is not None:
        shutil.copytree(runs, work / "runs")
    env = _environment(tmp_path)
    steps = [b for b in blocks if b.action in ("run", "file")]
    chain: list[Block] = []
    for n, block in enumerate(steps):
        if block.action == "file":
            target = work / block.markers["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
            continue
        if "before" in block.markers:
            _step(f"the setup of {block.where} ({block.markers['before']})", ["bash", "-c", block.markers["before"]],
                  work, env, [block])
        if block.kind == "shell":
            script = scripts / f"{page.stem}-{block.line}.sh"
            script.write_text(_laid_out([block], "set -eo pipefail; PS4='+ line $LINENO: '; set -x",
                                        console=block.lang == "console"))
            _step(f"the shell block at {block.where}", ["bash", str(script)], work, env, [block])
            continue
        chain = [*chain, block] if "continues" in block.markers else [block]
        following = steps[n + 1] if n + 1 < len(steps) else None
        if following is not None and following.kind == "python" and "continues" in following.markers:
            continue  # runs with the blocks that continue it
        script = scripts / f"{page.stem}-{chain[0].line}.py"
        script.write_text(_laid_out(chain))
        lines = f"lines {chain[0].line}-{chain[-1].line + len(chain[-1].lines)}"
        _step(f"the Python of {_rel(page)} {lines} (run as one script)", [sys.executable, str(script)],
              work, env, chain)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _runs_something(p)], ids=_page_id)
def test_page_runs(page, tmp_path, default_run):
    run_page(page, tmp_path, default_run)


# --------------------------------------------------------------------------- the branchnas shim


def _command(argv: list[str]) -> tuple[str, dict] | None:
    """``(command name, its parsed parameters)`` of a branchnas command line that takes --set."""
    import importlib

    import click
    from branchnas_cli.main import COMMANDS

    position = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if position is None or {"-h", "--help", "--version"} & set(argv[:position]) or argv[position] not in COMMANDS:
        return None
    name, rest = argv[position], argv[position + 1:]
    try:
        command = importlib.import_module(f"branchnas_cli.{name}").command
    except ModuleNotFoundError:
        return None
    if not any(param.name == "overrides" for param in command.params) or {"-h", "--help"} & set(rest):
        return None
    try:
        ctx = command.make_context(name, list(rest), resilient_parsing=True)
    except click.ClickException:
        return None
    return name, dict(ctx.params)


def _recipe(params: dict):
    """The recipe the command runs (a run directory's own recipe.toml), or None when it is invalid."""
    from branchnas.errors import UserError
    from branchnas.recipe import load_recipe

    source = params.get("recipe") or params.get("source")
    if source and Path(source).is_dir():
        source = Path(source) / "recipe.toml"
    try:
        return load_recipe(source, list(params.get("overrides") or ()))
    except (UserError, OSError, ValueError):
        return None  # branchnas itself reports it


def _tiny_sets(argv: list[str]) -> list[str]:
    """The ``--set`` arguments that make a branchnas command line tiny (see the module docstring)."""
    found = _command(argv)
    recipe = _recipe(found[1]) if found else None
    if recipe is None:
        return []
    sets = []
    for stage in ("pretrain", "finetune"):
        if getattr(recipe, stage).epochs > TINY_EPOCHS:
            sets.append(f"{stage}.epochs={TINY_EPOCHS}")
        sets.append(f"{stage}.device=cpu")
    if not recipe.data.root:  # generated data: any number of images
        shrunk = {}
        for split, tiny in TINY_SPLITS.items():
            given = getattr(recipe.data, f"num_{split}")
            if given == 0 or given > tiny:
                sets.append(f"data.num_{split}={tiny}")
                shrunk[split] = given
        # K shrinks with its split, unless it did not fit the recipe's own split either.
        split, images = recipe.affinity.split, recipe.affinity.images
        if split in shrunk and images > TINY_SPLITS[split] and (shrunk[split] == 0 or images <= shrunk[split]):
            sets.append(f"affinity.images={TINY_AFFINITY_IMAGES}")
    return [arg for item in sets for arg in ("--set", item)]


def _budget_problem(argv: list[str]) -> str | None:
    """A budget the command line gives that every tree fits, so the example chooses nothing."""
    found = _command(argv)
    if found is None:
        return None
    name, params = found
    given = params.get("budget") if name == "search" else None
    given = given or next((o.split("=", 1)[1] for o in params.get("overrides") or () if o.startswith("search.budget=")),
                          None)
    recipe = _recipe(params)
    if given is None or recipe is None:
        return None
    source = params.get("recipe") or params.get("source")
    run = Path(source) if source and Path(source).is_dir() else Path(recipe.out) / recipe.name
    tree_file = run / "search" / "tree.json"
    if not tree_file.is_file():
        return None
    tree = json.loads(tree_file.read_text(encoding="utf-8"))
    budget, smallest, largest = tree.get("budget"), tree.get("min_size"), tree.get("max_size")
    if budget is None or largest is None or budget < largest:
        return None
    return (f"the budget {given} is at or above the largest tree ({largest:,} {tree.get('metric')}, every task "
            f"separate), so every tree fits and the example chooses nothing; give one between {smallest:,} "
            f"(all shared) and {largest:,}")


def shim(argv: list[str]) -> int:
    """``branchnas ARGS``, with the tiny settings appended and the budget checked afterwards."""
    from branchnas_cli.main import main

    args = [*argv, *_tiny_sets(argv)]
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    if code == 0 and (problem := _budget_problem(args)):
        print(f"docs example: {problem}", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(shim(sys.argv[1:]))
