"""``python -m gptjax.aot``: runs :mod:`gptjax.cli.aot`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "aot")
