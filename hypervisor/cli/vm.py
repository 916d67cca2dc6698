"""`omega vm` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="vm commands.", no_args_is_help=True)
