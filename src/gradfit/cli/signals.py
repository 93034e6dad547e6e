"""Stop a fit cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, keep the best result.

``stop_on_signals()`` installs handlers only for the duration of a ``with`` block and then
restores the previous ones. The first signal only sets a flag, which the loop's hook reads
after the current step; a second signal raises ``KeyboardInterrupt`` at once, for a fit that
is stuck inside one long step. Python runs the handlers between bytecodes: a signal that
arrives while Levenberg–Marquardt's compiled kernel runs (no bytecode until it returns, a
few milliseconds for a fit) is handled when it returns, and the fit ends "interrupted" with
the kernel's finished parameters (``optim/dispatch.py``). Outside the block (and so in the
library's ``fit`` unless a caller asks) Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by a signal handler; ``hook`` is a loop hook that stops the loop once it is set."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + (self.signum or 0)

    def hook(self, epoch: int, loss: float) -> bool:
        return self.signum is not None

    # it only asks "stop?": Levenberg–Marquardt keeps its compiled kernel, which asks it once,
    # when it returns (optim/dispatch.py); a bound method reads its function's attributes
    hook.stop_only = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, ``signals`` set the yielded ``StopRequest`` instead of killing.

    Example:
        >>> with stop_on_signals() as stop:
        ...     signal.raise_signal(signal.SIGTERM)  # handled at once: no exit
        >>> stop.requested, stop.name, stop.exit_code
        (True, 'SIGTERM', 143)
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread may install handlers; keep the defaults
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.signum is not None:  # asked twice: the current step is taking too long
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
