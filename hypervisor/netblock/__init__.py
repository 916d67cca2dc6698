"""netblock."""
