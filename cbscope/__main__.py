"""``python -m cbscope`` runs the CLI (so ``accelerate launch -m cbscope train ...`` works)."""

from cbscope.cli import main

main()
