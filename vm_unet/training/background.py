"""Ordered file writes on a background thread, so that the training loop does not wait on the disk.

At the end of an epoch the trainer writes a checkpoint (last.pt holds the optimizer's moments: about 330 MB for
``vmunet_isic``), often a second one (best.pt), the history and two PNGs. Written in the loop, that took 1.3-2.4 s an
epoch on an H200 host against 3.3 s of training (BENCHMARKS.md, twenty-eighth session). The loop now only takes the
snapshot (CPU copies of the tensors, see ``vm_unet.checkpoint.checkpoint_payload``) and queues the writes here.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable


class BackgroundWriter:
    """Runs queued jobs one at a time, in the order queued, on one thread. A job that fails stops every job after it
    (a later checkpoint must not land beside an earlier one that failed), and its error is raised by every later
    ``submit`` and ``wait``. Every file job is expected to be atomic itself (temp file, then rename)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        # a daemon, so a crashed run never hangs at exit; the trainer waits for it on every way out
        self._thread = threading.Thread(target=self._run, name="vm_unet-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            fn, args = self._jobs.get()
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 (handed to the training thread)
                self._error = e
            finally:
                self._jobs.task_done()

    def submit(self, fn: Callable, *args) -> None:
        self._raise()
        self._jobs.put((fn, args))

    def wait(self) -> None:
        """Block until every queued job has run; raise the first error one of them hit."""
        self._jobs.join()
        self._raise()

    def _raise(self):
        if self._error is not None:
            raise self._error
