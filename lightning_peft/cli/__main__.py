"""`python -m lightning_peft.cli`: the same as the `lightning-peft` command."""

from lightning_peft.cli.main import main

main()
