"""CLI subcommands, one module each (see :data:`tokenmerge.cli.COMMANDS`)."""
