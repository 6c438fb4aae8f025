"""``python -m gptjax.download``: runs :mod:`gptjax.cli.download`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "download")
