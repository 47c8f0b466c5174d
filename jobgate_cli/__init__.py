"""The ``jobgate`` command line tool (``jobgate_cli.app``)."""
