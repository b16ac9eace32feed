"""The ``gpd`` command line, one module per command group: surgery (expand, plan, extract, inspect), verify,
train, eval; ``common`` holds the app, the error wrapper and what the commands share."""
from . import surgery, verify, train, eval  # noqa: F401  (registering the commands, in the order --help lists them)
from .common import app, main

__all__ = ["app", "main"]
