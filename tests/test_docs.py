"""The documentation: generated reference pages are current, links resolve, commands exist.

docs/cli.md and docs/recipes.md are generated; when a drift test fails, regenerate them:

    python docs/reference.py cli > docs/cli.md
    python docs/reference.py recipes > docs/recipes.md
"""

from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path

import click
import pytest
from branchnas_cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    """docs/reference.py: docs tooling, kept out of the installed package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("branchnas_docs_reference", ROOT / "docs" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reference = _load_reference()
PAGES, _escape, main = _reference.PAGES, _reference._escape, _reference.main
cli_reference_markdown, recipe_reference_markdown = _reference.cli_reference_markdown, _reference.recipe_reference_markdown
DOCS = ROOT / "docs"
MARKDOWN = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _drift_message(page: str, actual: str, expected: str) -> str:
    path = PAGES[page][0]
    diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(),
                                f"{path} (committed)", f"{path} (generated now)", lineterm="", n=1)
    shown = "\n".join(list(diff)[:60])
    return f"{path} is out of date; regenerate it with\n\n    python docs/reference.py {page} > {path}\n\n{shown}"


# --------------------------------------------------------------------------- generated pages


@pytest.mark.parametrize("page, generate", [("cli", cli_reference_markdown), ("recipes", recipe_reference_markdown)])
def test_generated_page_is_up_to_date(page, generate):
    path = ROOT / PAGES[page][0]
    assert path.is_file(), f"{PAGES[page][0]} is missing; create it with python docs/reference.py {page} > {PAGES[page][0]}"
    actual, expected = path.read_text(encoding="utf-8"), generate()
    assert actual == expected, _drift_message(page, actual, expected)


def _sections(text: str, prefix: str) -> dict[str, str]:
    """Heading text -> the text up to the next heading of the same level."""
    parts = re.split(rf"^{re.escape(prefix)} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _import_command(name: str) -> click.Command | None:
    """The command object, or None when its module has not been written yet."""
    module_name = f"branchnas_cli.{name}"
    try:
        return importlib.import_module(module_name).command
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None


def test_cli_reference_documents_every_command_and_option():
    sections = _sections(cli_reference_markdown(), "##")
    assert list(sections)[0] == "branchnas"
    assert [s.removeprefix("branchnas ") for s in list(sections)[1:]] == list(COMMANDS)
    for name, summary in COMMANDS.items():
        body = sections[f"branchnas {name}"]
        assert summary.split(":")[0] in body
        command = _import_command(name)
        if command is None:
            assert "Not available" in body
            continue
        assert f"branchnas {name}" in body.split("```")[1], f"no usage line for {name}"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for opt in param.opts:
                    assert f"`{opt}" in body or f", {opt}" in body, f"branchnas {name}: option {opt} is not documented"


def test_recipe_reference_documents_every_key_and_dataset_option():
    from branchnas.data import get_family, list_families
    from branchnas.recipe import section_docs

    text = recipe_reference_markdown()
    sections = _sections(text, "##")
    for section, rows in section_docs().items():
        title = {"(top level)": "Top level", "[tasks]": "[[tasks]]"}.get(section, f"[{section}]")
        assert title in sections, f"no section for {section}"
        for key, default, _ in rows:
            body = sections[title]
            assert f"| `{key}` | `{default}` |" in body or f"| `{key}` | (required) |" in body, (
                f"{section}.{key} (default {default}) is not documented")
    families = _sections(text, "###")
    for name in list_families():
        assert name in families, f"dataset {name} has no options section"
        for option, _, _ in get_family(name).describe_options():
            assert f"| `{option}` |" in families[name], f"data.options.{option} of {name} is not documented"


def test_reference_module_prints_a_page_and_refuses_unknown_ones(capsys):
    assert main(["cli"]) == 0
    assert capsys.readouterr().out == cli_reference_markdown()
    assert main(["nonsense"]) == 2
    assert "usage: python docs/reference.py" in capsys.readouterr().err


def test_escape_keeps_code_and_hides_nothing():
    assert _escape("<run dir>/export `a <b>` 2*x") == "&lt;run dir&gt;/export `a <b>` 2\\*x"


# --------------------------------------------------------------------------- links


_FENCE = re.compile(r"^(```|~~~)(.*?)\n.*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _LINK.findall(prose) + _REF_DEF.findall(prose)


def _slugs(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    seen: dict[str, int] = {}
    slugs = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", text), re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def test_link_extraction_sees_links_but_not_code():
    text = "See [a](a.md) and [b](b.md#x 'ignored').\n\n```text\n[c](c.md)\n```\n`[d](d.md)`\n[e]: e.md\n"
    assert sorted(_links(text)) == ["a.md", "b.md#x", "e.md"]
    assert _slugs("# The `branchnas run` page\n## Δ_MTL and more\n## Δ_MTL and more\n") == {
        "the-branchnas-run-page", "δ_mtl-and-more", "δ_mtl-and-more-1"}


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in _links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} ({_rel(path)} -> {resolved} does not exist)")
        elif fragment and resolved.suffix == ".md" and fragment not in _slugs(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    assert not broken, f"broken links in {_rel(path)}:\n" + "\n".join(broken)


def test_every_page_of_docs_is_linked_from_the_index():
    linked = {(DOCS / t.partition("#")[0]).resolve() for t in _links((DOCS / "index.md").read_text(encoding="utf-8"))}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link to: {', '.join(missing)}"


def _toml_blocks(path: Path) -> list[str]:
    return [m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] for m in _FENCE.finditer(path.read_text(encoding="utf-8"))
            if m.group(2).strip().lower() == "toml"]


def test_toml_examples_in_the_docs_are_valid_recipes(tmp_path, monkeypatch):
    from branchnas.errors import UserError
    from branchnas.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    blocks = [(path, block) for path in MARKDOWN for block in _toml_blocks(path)]
    assert blocks, "the docs show no recipe?"
    for i, (path, block) in enumerate(blocks):
        recipe_file = tmp_path / f"example{i}.toml"
        recipe_file.write_text(block)
        try:
            load_recipe(recipe_file)
        except UserError as err:
            pytest.fail(f"a TOML example in {_rel(path)} is not a valid recipe: {err}\n{block}")


# --------------------------------------------------------------------------- command lines


_NOT_SHELL = {"python", "py", "toml", "json", "yaml"}
_COMMAND = re.compile(r"(?:^|[\s/;&|(])branchnas((?:\s+--?[A-Za-z][\w-]*)*)\s+([^\s#|;&>]+)")


def _shell_lines(text: str) -> list[str]:
    """Lines of shell-like code blocks, and inline code spans, that may run branchnas."""
    lines = []
    for match in _FENCE.finditer(text):
        if match.group(2).strip().lower() in _NOT_SHELL:
            continue
        lines += match.group(0).splitlines()[1:-1]
    lines += [span.strip("`") for span in _INLINE_CODE.findall(_FENCE.sub("", text))]
    return lines


def _command_uses(path: Path) -> list[tuple[str, str, list[str]]]:
    """``(line, command, long options after it)`` for every `branchnas COMMAND ...` in ``path``."""
    uses = []
    for line in _shell_lines(path.read_text(encoding="utf-8")):
        code = re.split(r"\s#|\s\|\s|&&|;|\s>\s", line)
        for part in code:
            match = _COMMAND.search(part)
            if not match:
                continue
            word = match.group(2)
            if not word[0].isalpha() or word.isupper():  # an option, or a placeholder: [OPTIONS] COMMAND ...
                continue
            rest = part[match.end():]
            options = [tok.split("=", 1)[0] for tok in rest.split() if tok.startswith("--")]
            uses.append((line.strip(), word, options))
    return uses


def test_command_line_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\n.venv/bin/branchnas run --set a=1   # the pipeline\nbranchnas --debug recipe > x.toml\n"
                    "branchnas --help\nbranchnas [OPTIONS] COMMAND\n```\n```python\nbranchnas nope\n```\n"
                    "See `branchnas datasets NAME` and `branchnas/cost.py`.\n")
    assert _command_uses(page) == [
        (".venv/bin/branchnas run --set a=1   # the pipeline", "run", ["--set"]),
        ("branchnas --debug recipe > x.toml", "recipe", []),
        ("branchnas datasets NAME", "datasets", []),
    ]


def test_command_lines_in_the_docs_name_existing_commands():
    uses = [(path, line, word) for path in MARKDOWN for line, word, _ in _command_uses(path)]
    assert {"run", "search", "recipe", "export"} <= {word for _, _, word in uses}, "the docs show no command lines?"
    unknown = [f"{_rel(path)}: {line!r} ('{word}')" for path, line, word in uses if word not in COMMANDS]
    assert not unknown, "command lines that name no branchnas command:\n" + "\n".join(unknown)


#: the commands whose options the docs show
_WITH_OPTIONS = sorted({word for path in MARKDOWN for _, word, options in _command_uses(path) if options} & set(COMMANDS))


def test_the_docs_show_options():
    assert {"run", "search", "affinity"} <= set(_WITH_OPTIONS)


@pytest.mark.parametrize("name", _WITH_OPTIONS)
def test_options_shown_in_the_docs_exist(name):
    uses = [(path, line, options) for path in MARKDOWN for line, word, options in _command_uses(path) if word == name]
    shown = [(path, line, opt) for path, line, options in uses for opt in options]
    command = _import_command(name)
    if command is None:
        pytest.skip(f"`branchnas {name}` is registered but cli/{name}.py does not exist yet")
    declared = {"--help", "-h"} | {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    wrong = [f"{_rel(path)}: {line!r} ({opt})" for path, line, opt in shown if opt not in declared]
    assert not wrong, f"options that `branchnas {name}` does not have:\n" + "\n".join(wrong)
