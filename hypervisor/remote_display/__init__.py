"""remote_display."""
