"""CLI command modules; each defines ``register(app)`` and is listed in ``adjointdpm.cli.COMMAND_MODULES``."""
