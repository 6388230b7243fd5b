"""The ``ciliate`` command line: core commands here, service commands as entry-point plugins."""
