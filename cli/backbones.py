"""`branchnas backbones`: the backbones, their branch points, params and FLOPs."""

from __future__ import annotations

import re

import click
from branchnas_cli._options import emit_json, json_option, stdout_to_stderr

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    match = _SIZE.match(value)
    if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
        raise click.BadParameter(f"expected a size such as 64 or 32x64 (height x width); got {value!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@click.command(name="backbones")
@click.argument("name", required=False)
@click.option("--size", default="64", show_default=True, callback=_parse_size, metavar="N|HxW",
              help="Input image size the FLOPs are measured at.")
@click.option("--granularity", type=click.Choice(["stage", "block"]), default="stage", show_default=True,
              help="Branch points per stage or per residual block.")
@click.option("--in-channels", type=click.IntRange(min=1), default=3, show_default=True,
              help="Input image channels.")
@json_option
def command(name: str | None, size: tuple[int, int], granularity: str, in_channels: int, as_json: bool) -> None:
    """List the backbones, or describe backbone NAME, with their branch points.

    For each backbone: the number D of branch points at both granularities, then for the
    stem and each block at --granularity its output channels, reduction (input size /
    feature size), parameters and FLOPs for one image of --size. FLOPs come from fvcore,
    which counts one multiply-add as one flop; the stem is always shared.

    With --json: {size: [H, W], in_channels, granularity, flops: "fvcore, one multiply-add = one
    flop", backbones: [{name, summary, depth: {stage, block}, width, dilation, params, flops,
    points: [{point, block, channels, reduction, params, flops}]}]}, counts as integers.
    """
    from tabulate import tabulate

    from branchnas.backbones import backbone_entry, build_backbone, list_backbones
    from branchnas.budget import format_count
    from branchnas.cost import block_costs
    from branchnas.recipe import BackboneConfig

    names = [backbone_entry(name).name] if name else list_backbones()
    height, width = size
    header = (
        f"Backbones at {height}x{width} with {in_channels} input channel{'s' * (in_channels != 1)}; "
        f"blocks at '{granularity}' granularity; FLOPs by fvcore (one multiply-add = one flop)."
    )
    listing: list[dict[str, object]] = []
    with stdout_to_stderr(as_json):
        for backbone_name in names:
            entry = backbone_entry(backbone_name)
            built = {
                g: build_backbone(BackboneConfig(name=backbone_name, granularity=g), in_channels, size)
                for g in ("stage", "block")
            }
            backbone = built[granularity]
            costs = block_costs(backbone, {}, size)
            options = [f"width {'yes' if entry.width else 'no'}", f"dilation {'yes' if entry.dilation else 'no'}"]
            total_params = costs.stem_params + sum(costs.block_params)
            total_flops = costs.stem_flops + sum(costs.block_flops)
            rows = [["stem", backbone.stem_info.name, backbone.stem_info.channels, backbone.stem_info.reduction,
                     format_count(costs.stem_params), format_count(costs.stem_flops)]]
            for d, (info, params, flops) in enumerate(
                zip(backbone.block_info, costs.block_params, costs.block_flops, strict=True), start=1
            ):
                rows.append([d, info.name, info.channels, info.reduction, format_count(params), format_count(flops)])
            if as_json:
                points = [{"point": "stem", "block": backbone.stem_info.name, "channels": backbone.stem_info.channels,
                           "reduction": backbone.stem_info.reduction, "params": costs.stem_params,
                           "flops": costs.stem_flops}]
                points += [{"point": d, "block": info.name, "channels": info.channels, "reduction": info.reduction,
                            "params": params, "flops": flops}
                           for d, (info, params, flops) in enumerate(
                               zip(backbone.block_info, costs.block_params, costs.block_flops, strict=True), start=1)]
                listing.append({"name": backbone_name, "summary": entry.summary,
                                "depth": {"stage": built["stage"].num_blocks, "block": built["block"].num_blocks},
                                "width": bool(entry.width), "dilation": bool(entry.dilation),
                                "params": total_params, "flops": total_flops, "points": points})
                continue
            if header:
                # Printed only once the first backbone built, so a bad size fails without it.
                click.echo(header)
                header = ""
            click.echo()
            click.echo(f"{backbone_name}: {entry.summary}")
            click.echo(
                f"  D = {built['stage'].num_blocks} (stage), {built['block'].num_blocks} (block); {', '.join(options)}; "
                f"encoder {format_count(total_params)} params, {format_count(total_flops)} FLOPs"
            )
            table = tabulate(rows, headers=["point", "block", "channels", "reduction", "params", "FLOPs"],
                             tablefmt="simple", disable_numparse=True)
            click.echo("\n".join("  " + line for line in table.splitlines()))
    if as_json:
        emit_json({"size": [height, width], "in_channels": in_channels, "granularity": granularity,
                   "flops": "fvcore, one multiply-add = one flop", "backbones": listing})
