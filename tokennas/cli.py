"""The `tokennas` command line: spaces, presets, flops, search, export, report, train."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Neural architecture search over the token schedules of vision transformers.")
console = Console()
# typer vendors click; its usage errors share this base class.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@app.command()
def presets(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List the named paper variants with family, parameters and FLOPs (MACs)."""
    from . import count_flops, list_presets, load_config
    from .config import PRESETS
    from .flops import format_flops

    rows = []
    for name in list_presets():
        config = load_config(name)
        rows.append({"name": name, "family": config.family, "img_size": config.img_size,
                     "params": config.num_params(), "flops": count_flops(config), "description": PRESETS[name][1]})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("preset", "family", "img", "params", "FLOPs", "what it is", title="tokennas presets")
    for r in rows:
        table.add_row(r["name"], r["family"], str(r["img_size"]), f"{r['params'] / 1e6:.2f}M",
                      format_flops(r["flops"]), r["description"])
    console.print(table)


@app.command()
def flops(
    name: str = typer.Argument(..., help="A preset name or a config .yaml/.json file."),
    method: str = typer.Option("analytic", help="analytic (closed form) or fvcore (traced)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """FLOPs (multiply-accumulates) and parameters of a preset or config, per module."""
    from .config import load_config
    from .flops import METHODS, flops_by_module, format_flops

    config = load_config(name)
    if method not in METHODS:
        raise ValueError(f"invalid --method {method!r}; expected one of: {', '.join(METHODS)}")
    per_module = flops_by_module(config, method)
    total = sum(per_module.values())
    if as_json:
        print(json.dumps({"name": name, "family": config.family, "img_size": config.img_size,
                          "flops": total, "params": config.num_params()}))
        return
    table = Table("module", "FLOPs", "share", title=f"{name} ({config.family}, {config.img_size}px, {method})")
    for module, value in per_module.items():
        table.add_row(module, format_flops(value), f"{100 * value / total:.1f}%")
    table.add_row("total", format_flops(total), "100%", style="bold")
    console.print(table)
    console.print(f"parameters: {config.num_params():,}")


@app.command()
def spaces(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List the search spaces, their dimensions and the size of each."""
    from .spaces import SPACES, Inputs

    inputs = Inputs()
    rows = [{"name": s.name, "description": s.description, "size": s.size(inputs),
             "dimensions": {k: list(v) for k, v in s.dimensions(inputs).items()}} for s in SPACES.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        console.print(f"[bold]{r['name']}[/bold]  {r['size']:,} candidates at {inputs.img_size}px")
        console.print(f"  {r['description']}")
        for dim, choices in r["dimensions"].items():
            console.print(f"  {dim}: {', '.join(map(str, choices))}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors on stderr and exit code 2 for bad input, never a traceback."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="tokennas", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
            print(err.ctx.get_help())
            code = 0
        else:
            print(f"error: {err.format_message()}", file=sys.stderr)
            code = 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        code = 130
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
