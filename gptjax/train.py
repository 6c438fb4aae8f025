"""``python -m gptjax.train``: runs :mod:`gptjax.cli.train`, where the command's code lives."""

from gptjax.cli import command_shim

command_shim(__name__, "train")
