"""One resumable pass of a frozen teacher over a training source.

``facekd teacher centres`` (class sums) and ``facekd teacher cache`` (one row per sample
and view) walk a source the same way: every sample once, in the loader's fixed order
(seed 0, epoch 0, no flip, nothing dropped), each batch scaled by
:func:`facekd.data.loader.normalise_batch` onto the teacher's input device, a resume point
every ``save_every`` batches that records the loader's position, a killed pass picked up
at the last one, and one progress bar. :class:`TeacherPass` is that loop. What a batch
adds (the two jobs run the teacher on differently shaped batches) and how a resume point
is stored (running sums in one file; a chunk of rows plus a progress file) stay with the
caller, as the ``add_batch`` and ``save`` callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from facekd.errors import ConfigError

log = logging.getLogger(__name__)


def check_pass_sizes(batch_size: int, save_every: int, what: str) -> None:
    """Both counts must be positive; ``what`` names them for the user."""
    if batch_size <= 0 or save_every <= 0:
        raise ConfigError(f"{what} must be positive")


class TeacherPass:
    """The loop over ``source`` in pass order, with resume points and a progress bar.

    ``loader_factory`` is :func:`facekd.data.loader.build_train_loader` or a stand-in with
    its signature; ``loader_options`` go to it as well (a rank's share, pinned memory).
    """

    def __init__(self, loader_factory: Callable[..., Any] | None, source: Any,
                 batch_size: int, *, num_workers: int, save_every: int, desc: str,
                 input_device: Any = None, progress: bool = True,
                 **loader_options: Any) -> None:
        if loader_factory is None:
            from facekd.data.loader import build_train_loader as loader_factory
        self.loader = loader_factory(source, batch_size, seed=0, epoch=0, flip=False,
                                     drop_last=False, labelled=True, num_workers=num_workers,
                                     **loader_options)
        self.save_every = int(save_every)
        self.desc = desc
        self.input_device = input_device
        self.progress = progress

    def __len__(self) -> int:
        return len(self.loader)

    def position(self) -> dict[str, Any]:
        """The loader state a resume point records (the batches done so far)."""
        return self.loader.state_dict()

    def resume(self, position: dict[str, Any], where: Any) -> None:
        """Continue after the batches ``position`` (a saved :meth:`position`) had done."""
        self.loader.load_state_dict(position)
        log.info("resuming %s from %s", self.desc, where)

    def run(self, add_batch: Callable[[torch.Tensor, dict[str, Any]], None],
            save: Callable[[], None]) -> None:
        """``add_batch(images, batch)`` for each remaining batch, ``save()`` every
        ``save_every`` of them; ``images`` are the batch's in [-1, 1] on the input device.
        A last partial stretch is not saved here: the caller finishes the job instead."""
        from tqdm import tqdm

        from facekd.data.loader import normalise_batch

        done = min(len(self.loader), int(self.position().get("batches_done", 0)))
        bar = tqdm(total=len(self.loader), initial=done, desc=self.desc, unit="batch",
                   disable=None if self.progress else True)  # None: no bar when not a tty
        since_save = 0
        for batch in self.loader:
            add_batch(normalise_batch(batch["image"], self.input_device), batch)
            bar.update(1)
            since_save += 1
            if since_save >= self.save_every:
                since_save = 0
                save()
        bar.close()
