"""SIGTERM and SIGINT end a run at the next step boundary, resumable, instead of killing it.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job, and Ctrl+C
sends SIGINT. While a `StopSignals` is installed, the first such signal only sets a flag:
the training loop finishes its step, saves a checkpoint and raises `Stopped`, which the
command line prints as one line and exits with 128 + the signal's number (143, 130) so a
scheduler sees the signal. The evaluation loop stops after its batch (the rows of every
finished batch are on disk). A second SIGINT interrupts at once, as Ctrl+C usually does.
Under torchrun every process receives the signal; `requested` lets them agree (a
collective) so all stop at the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from medlvr.errors import MedlvrError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(MedlvrError):
    """The run stopped on a signal after saving what resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Installs the handlers (main thread only; elsewhere it never requests a stop); `restore()` undoes it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: now
        self.signum = signum

    def requested(self, accelerator: Any = None) -> bool:
        """Whether a signal asked to stop (on any process of the launch, with `accelerator`)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None

    def stopped(self, what: str) -> Stopped:
        """The exception that ends the run: `what` says what was saved and how to continue."""
        assert self.signum is not None
        return Stopped(f"stopped by {signal.Signals(self.signum).name}: {what}", self.signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


__all__ = ["Stopped", "StopSignals", "SIGNALS"]
