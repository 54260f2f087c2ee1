"""Run configs and compare them: `PeftCLI`, `compare`, its records and figures, the rank search and `suggest`."""
