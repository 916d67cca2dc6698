"""`omega dsm` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="dsm commands.", no_args_is_help=True)
