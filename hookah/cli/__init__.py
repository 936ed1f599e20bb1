"""The ``hookah`` command: client subcommands over HTTP, and ``hookah serve``."""
