"""``python -m gptjax.convert``: runs :mod:`gptjax.cli.convert`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "convert")
