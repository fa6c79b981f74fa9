"""The `rankseg` command line: thin Typer commands over `rankseg_core`."""
