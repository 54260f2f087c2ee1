"""A callback that freezes training after a given step so a test can SIGKILL the process there."""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HangAfterStep(Callback):
    """After `step` optimizer steps, touch `marker` and hang (checkpoint callbacks run after this one)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)  # the test kills us here
