"""`omega display` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="display commands.", no_args_is_help=True)
