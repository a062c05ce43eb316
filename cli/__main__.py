"""`python -m mixem.cli ...` (what torchrun launches) runs the same app as `mixem-fast`."""

from mixem.cli.app import main

main()
