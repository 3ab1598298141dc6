"""`branchnas datasets`: the dataset families, their targets and their options."""

from __future__ import annotations

import textwrap
from typing import Any

import click
from branchnas_cli._options import emit_json, json_option


def _value(value: Any) -> str:
    """An option default as it would be written in a recipe."""
    from branchnas.recipe import _toml_value

    return _toml_value(value)


def _kind(spec: Any) -> str:
    if spec.num_classes:
        return f"{spec.kind} ({spec.num_classes} classes)"
    if spec.kind == "normals":
        return f"{spec.kind} (3 channels)"
    return spec.kind


def _groups(targets: dict[str, Any]) -> dict[str, list[str]]:
    """Target names grouped by kind (and classes), for families with many targets."""
    groups: dict[str, list[str]] = {}
    for name, spec in targets.items():
        groups.setdefault(_kind(spec), []).append(name)
    return groups


def _describe(family: Any, verbose: bool) -> list[str]:
    """Lines that describe one family."""
    lines = [f"{family.name}: {family.summary}"]
    if family.needs_root:
        lines.append(f"  data.root (required): {family.layout}")
    else:
        lines.append("  data.root: not needed (generated in code)")
    targets = family.targets()
    defaults = {t.target or t.name for t in family.default_tasks()}
    if not targets:
        lines.append("  targets: whatever your [[tasks]] declare (see docs/custom-data.md)")
    elif len(targets) > 12 and not verbose:
        lines.append(f"  {len(targets)} targets (`branchnas datasets {family.name}` lists them one per line):")
        for kind, names in _groups(targets).items():
            names_in_defaults = " (the default tasks)" if set(names) <= defaults else ""
            lines.append(f"    {len(names)} {kind}{names_in_defaults}:")
            lines.extend(textwrap.wrap(", ".join(names), 92, initial_indent="      ", subsequent_indent="      ",
                                       break_on_hyphens=False))
    else:
        lines.append("  targets (* = a default task):")
        width = max(len(name) for name in targets)
        for name, spec in targets.items():
            mark = "*" if name in defaults else " "
            lines.append(f"   {mark}{name:<{width}}  {_kind(spec):<30} {spec.description}".rstrip())
    rows = family.describe_options()
    if rows:
        lines.append("  options ([data] options = { ... }):")
        width = max(len(name) for name, _, _ in rows)
        for name, default, doc in rows:
            lines.append(f"    {name:<{width}} = {_value(default):<14} {doc}".rstrip())
    else:
        lines.append("  options: none")
    return lines


def _as_data(family: Any) -> dict[str, Any]:
    """One family as JSON-able data (``--json``)."""
    defaults = {t.target or t.name for t in family.default_tasks()}
    return {
        "name": family.name,
        "summary": family.summary,
        "needs_root": bool(family.needs_root),
        "layout": family.layout if family.needs_root else None,
        "targets": [{"name": name, "kind": spec.kind, "num_classes": spec.num_classes, "channels": spec.channels,
                     "description": spec.description, "default": name in defaults}
                    for name, spec in family.targets().items()],
        "options": [{"name": option, "default": default, "doc": doc}
                    for option, default, doc in family.describe_options()],
    }


@click.command(name="datasets")
@click.argument("name", required=False)
@click.option("--all", "verbose", is_flag=True, help="List every target one per line, also for families with many.")
@json_option
def command(name: str | None, verbose: bool, as_json: bool) -> None:
    """List the dataset families, or describe family NAME.

    For each family: what it is, whether it reads files from data.root (and which), its
    targets with their kind and classes (the starred ones are the tasks used when a
    recipe lists no [[tasks]]), and its [data] options with their defaults.

    \b
    Pick one in a recipe:
      [data]
      dataset = "digits"
      options = { scale = 2 }

    With --json: {families: [{name, summary, needs_root, layout, targets: [{name, kind,
    num_classes, channels, description, default}], options: [{name, default, doc}]}]}, every
    target listed.
    """
    from branchnas.data import get_family, list_families

    names = [get_family(name).name] if name else list_families()
    if as_json:
        emit_json({"families": [_as_data(get_family(n)) for n in names]})
        return
    blocks = ["\n".join(_describe(get_family(n), verbose or bool(name))) for n in names]
    if not name:
        click.echo("Dataset families ([data] dataset = NAME); `branchnas datasets NAME` shows one.\n")
    click.echo("\n\n".join(blocks))
