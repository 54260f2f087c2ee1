"""The `lightning-peft` command line: the only place that wires commands; nothing imports it."""
