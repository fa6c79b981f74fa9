"""`python -m rankseg_cli ...` (what `torchrun ... -m rankseg_cli train` runs)."""

from rankseg_cli.entry import main

main()
