"""`omega netblock` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="netblock commands.", no_args_is_help=True)
