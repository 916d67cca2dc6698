"""Compiled cffi modules built from native/ by meson (see native/meson.build).

In a development tree ``make native`` builds them and copies them here; in a
wheel meson installs them here.
"""
