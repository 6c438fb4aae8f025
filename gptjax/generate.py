"""``python -m gptjax.generate``: runs :mod:`gptjax.cli.generate`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "generate")
