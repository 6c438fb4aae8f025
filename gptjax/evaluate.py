"""``python -m gptjax.evaluate``: runs :mod:`gptjax.cli.evaluate`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "evaluate")
