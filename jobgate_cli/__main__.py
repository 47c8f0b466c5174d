"""``python -m jobgate_cli``: the same as the installed ``jobgate`` command."""

from .app import cli

if __name__ == "__main__":
    cli()
