"""The package version; must equal the top-level VERSION file read by meson."""

__version__ = "0.1.0"
