"""`python -m rankseg_cli ...` (what `torchrun ... -m rankseg_cli train` runs)."""

from .app import main

main()
