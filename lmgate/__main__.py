"""`python -m lmgate` runs the command line."""

from lmgate.cli import main

main()
