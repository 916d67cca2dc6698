"""`omega images` commands: build, list, show and delete guest images."""

from __future__ import annotations

from typing import Any

import typer

from hypervisor.cli._output import JSON_OPTION, emit, emit_json, emit_table
from hypervisor.config import Config
from hypervisor.units import format_size

app = typer.Typer(help="Guest images: build, list, show, delete.", no_args_is_help=True)

_COLUMNS = ("name", "digest", "size", "created", "recipe")


def _row(image: Any) -> dict[str, Any]:
    return {"name": image.name, "digest": image.short_digest, "size": format_size(image.size),
            "created": image.created, "recipe": image.recipe}


@app.command("build")
def build(
    recipe: str = typer.Argument(..., help="Recipe to build (tiny)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Build an image from a recipe and store it (same content → same digest)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from images.store import ImageStore

    config = Config.from_env()
    store = ImageStore(config)
    # The bar goes to stderr so `--json` output stays clean on stdout.
    with Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=as_json) as progress:
        task = progress.add_task(f"building {recipe}", total=1.0)

        def report(step: str, fraction: float) -> None:
            progress.update(task, completed=fraction, description=step)

        image = store.build(recipe, progress=report)
    if as_json:
        emit_json(image.to_dict())
    else:
        typer.echo(f"built {image.name} {image.short_digest} ({format_size(image.size)})")


@app.command("list")
def list_images(as_json: bool = JSON_OPTION) -> None:
    """List stored images, newest first."""
    from images.store import ImageStore

    images = ImageStore(Config.from_env()).list()
    emit([im.to_dict() for im in images], as_json,
         lambda _: emit_table([_row(im) for im in images], _COLUMNS))


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="Image name or digest prefix."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Verify an image's files and show it."""
    from images.store import ImageStore

    image = ImageStore(Config.from_env()).get(ref)

    def render(data: dict[str, Any]) -> None:
        for key in ("name", "digest", "recipe", "created", "size", "kernel", "initrd",
                    "cmdline"):
            typer.echo(f"{key:<8} {data[key]}")

    emit(image.to_dict(), as_json, render)


@app.command("delete")
def delete(ref: str = typer.Argument(..., help="Image name or digest prefix.")) -> None:
    """Delete an image from the store."""
    from images.store import ImageStore

    image = ImageStore(Config.from_env()).delete(ref)
    typer.echo(f"deleted {image.name} {image.short_digest}")
