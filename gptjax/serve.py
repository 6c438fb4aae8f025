"""``python -m gptjax.serve``: runs :mod:`gptjax.cli.serve`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "serve")
