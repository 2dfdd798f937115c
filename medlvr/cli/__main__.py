"""`python -m medlvr.cli ...` (for accelerate launch -m / torchrun -m)."""

from medlvr.cli import main

main()
