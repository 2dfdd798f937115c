"""`python -m medlvr ...`."""

from medlvr.cli import main

main()
