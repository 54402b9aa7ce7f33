"""`python -m alignpipe ...`, which is how `accelerate launch -m alignpipe run RECIPE` starts each process."""

from alignpipe.cli import main

main()
