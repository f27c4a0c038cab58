"""SIGTERM (what Kubernetes, Slurm and spot reclaims send) and Ctrl-C during `rayft train`: the same
graceful stop. The workers finish their step, write a checkpoint of it (unless the newest is of it) and
stop; the command exits 143 (SIGTERM) or 130 (SIGINT) printing the resume command. Workers that have not
stopped within scaling.stop_grace_s are aborted through Ray Train's own abort, as is a second signal.
Before the workers run, a signal stops the command at once (nothing to save yet).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs import attempts

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def stopped_by(signum: int | None) -> str:
    """The signal that stopped a run or a search, as its message says it (no signal: Ctrl-C, the usual one)."""
    signum = signum or signal.SIGINT
    return {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")


class GracefulStop:
    def __init__(self, run_dir: Path, grace_s: float):
        self.run_dir, self.grace_s = run_dir, grace_s
        self.received: int | None = None
        """The first signal received (its number), or None."""
        self._abort: Any = None  # Ray Train's SIGINT handler, which aborts the run, once fit() has installed it
        self._timer: threading.Timer | None = None
        self._first = 0.0

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _before_fit(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        raise KeyboardInterrupt

    def _during_fit(self, signum: int, frame: Any) -> None:
        if self.received is not None and time.time() - self._first < 1.0:
            return  # the same stop reaching this process twice (a job supervisor signals the driver and its parent)
        if self.received is not None:  # a second signal, or the grace period is over: abort now
            if self._abort is not None:
                self._abort(signal.SIGINT, frame)
                return
            raise KeyboardInterrupt
        self.received, self._first = signum, time.time()
        attempts.request_stop(self.run_dir, f"{NAMES.get(signum, signum)} received")
        self._timer = threading.Timer(self.grace_s, os.kill, args=(os.getpid(), signal.SIGINT))
        self._timer.daemon = True
        self._timer.start()

    def hook(self, trainer: Any) -> None:
        """Take Ctrl-C and SIGTERM over from Ray Train once its fit() has installed its SIGINT handler (kept
        as the abort). A Ray without that hook keeps its own Ctrl-C (abort at once); SIGTERM stays graceful."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        register = getattr(trainer, "_register_sigint_handler", None)
        signal.signal(signal.SIGTERM, self._during_fit)
        if register is None:
            return

        def install(controller: Any) -> None:
            register(controller)
            self._abort = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._during_fit)

        trainer._register_sigint_handler = install

    def after_fit(self) -> None:
        """The workers are gone: a signal now (during the export) stops the command at once."""
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for s in NAMES:
                signal.signal(s, self._before_fit)

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """Handlers for the whole command (main thread only); the defaults come back on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        saved = {s: signal.getsignal(s) for s in NAMES}
        for s in NAMES:
            signal.signal(s, self._before_fit)
        try:
            yield self
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for s, handler in saved.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[dict[str, int]]:
    """For `rayft tune`: SIGTERM is handled as Ctrl-C (Tune stops its trials and saves the search, which
    --resume continues); yields a dict whose "signal" is the first one received."""
    got: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def on_term(signum: int, frame: Any) -> None:
        got.setdefault("signal", signum)
        os.kill(os.getpid(), signal.SIGINT)

    saved = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, saved)
