"""The run's metrics, samples and settings for dashboards: TensorBoard event files in the run directory
(``tensorboard --logdir runs`` compares runs) and, given a wandb project, a Weights & Biases run.

Fed by :class:`gptjax.runs.RunWriter` with the records it appends to metrics.jsonl, which are host
floats by then: writing them never waits for the device.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

# Where a record was taken; the step records carry epoch and tokens_seen as scalars, the others repeat them.
POSITION = ("epoch", "tokens_seen")
WANDB_MISSING = "wandb_project needs the wandb package: pip install 'gptjax[wandb]'"


def check_wandb() -> None:
    """Raise the one-line error for a wandb project without its package, before any slow work."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(WANDB_MISSING) from None


def new_wandb_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as W&B makes them), kept in the run's config.json so
    that a resumed run logs into the same W&B run."""
    return secrets.token_hex(4)


class Dashboards:
    """TensorBoard (``tensorboard``) and W&B (``wandb_project``, ``wandb_id``) writers of one run, started
    at ``start_step``: a resumed run's TensorBoard file begins with a restart marker at that step, so
    TensorBoard drops what an earlier, lost attempt logged from there on (the lines resume trims from
    metrics.jsonl) instead of showing two values per step."""

    def __init__(self, run_dir: Path, settings: dict, *, tensorboard: bool = True, wandb_project: str | None = None,
                 wandb_id: str | None = None, start_step: int = 0):
        self.tb = self.wandb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step 0 too: a run that resumes from step 0 had no checkpoint, and all it logged is void.
            self.tb = SummaryWriter(str(run_dir), purge_step=start_step, flush_secs=30)
            self.tb.add_text("settings", "```\n" + json.dumps(settings, indent=2) + "\n```", start_step)
        if wandb_project is not None:
            import wandb

            # W&B keeps the first value it got for a step: steps a lost attempt logged are not replaced.
            self.wandb = wandb.init(project=wandb_project, id=wandb_id, resume="allow", dir=str(run_dir),
                                    config=settings)

    def log(self, record: dict, *, position: bool = True) -> None:
        """Every number of ``record`` but its step as a scalar at that step (``position=False``: not
        epoch and tokens_seen either, already logged with the step's own record)."""
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and _is_number(v)
                  and (position or k not in POSITION)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
