"""`AtomicCheckpointIO`: a crash-safe checkpoint writer, opted into as a Lightning plugin.

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[AdapterCallback(policy)])

Lightning's `TorchCheckpointIO` stages a checkpoint in the system temp dir and moves it into
place; across filesystems that move is a copy, which a crash can leave half-written at the
final path. This writer puts the temporary file next to the target, fsyncs it and renames it
(atomic within one directory), so a kill during a save leaves the previous file intact.

It is a plugin the user passes, never swapped in behind the strategy's back: `AdapterCallback`
leaves the checkpoint IO alone, and the `lightning-peft` command sets it as the default of
`trainer.plugins` (visible in `--print_config`, replaceable there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_peft.core.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but local files are written next to the target and renamed.

    Remote paths (`s3://...`) and calls with `storage_options` go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
