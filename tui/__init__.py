"""The Textual admin app."""
