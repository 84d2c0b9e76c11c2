"""One module per stage with its CLI commands; cli.py registers them."""
