"""``python -m gptjax.prepare``: runs :mod:`gptjax.cli.prepare`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "prepare")
