"""`omega node` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="node commands.", no_args_is_help=True)
