"""The `aspkd` command line."""
