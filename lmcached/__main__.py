"""`python -m lmcached` runs the command line."""

from lmcached.cli import main

main()
