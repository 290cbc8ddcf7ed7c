"""Stopping a training on Ctrl-C or SIGTERM: where the step ends, with that step saved.

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread is, and one that lands in a
finaliser (a weakref callback) is printed as "Exception ignored" and dropped while training goes on;
SIGTERM's default (`kill`, a scheduler preempting the job) kills on the spot, leaving the MLflow run
RUNNING and losing the steps since the last checkpoint. Here both only ask the loop to stop.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from clipmodel import distributed

if TYPE_CHECKING:
    from pipeline.loop import TrainState


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler preempting the job) stopping training as Ctrl-C does. `status` is the
    exit status a shell reports for it; `tracking.ended_on_error` and `distributed.reported_once` leave
    with it."""
    status = 128 + signal.SIGTERM


@contextmanager
def stopped_by_signal(name: str, state: TrainState, resume: bool, checkpoint: Path, total: int,
                      main: bool) -> Iterator[Callable[[], KeyboardInterrupt | None]]:
    """Ctrl-C or SIGTERM stops training where the step it lands in ends: after each step the loop asks
    the yielded function, which returns the exception to stop with (KeyboardInterrupt, or Terminated
    for SIGTERM) once a signal came, saves a checkpoint there and raises it before the next step. Rank
    0 then says (after the progress bar closes, after the stage's `name`) where the run stopped and
    what a rerun will do; the exception goes on, so the MLflow run ends KILLED. A second signal acts
    at once (Python's own Ctrl-C, the default SIGTERM), for a step that does not end.

    An error while a stop is pending counts as the stop, and so does a collective that failed because
    a faster peer left on its own signal. A signal whose handler is not Python's default (ignored in a
    background job, or an embedding app's own) is left as it was, and so is everything off the main
    thread."""
    came: int | None = None
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [sig for sig, handler in defaults.items() if threading.current_thread() is threading.main_thread()
            and signal.getsignal(sig) is handler]

    def first(signum: int, _frame) -> None:
        nonlocal came
        came = signum
        for sig in ours:
            signal.signal(sig, defaults[sig])

    for sig in ours:
        signal.signal(sig, first)
    try:
        yield lambda: _stop(came)
        if came is not None:  # during the last step (saved, as every last step is): the stage stops all the same
            raise _stop(came)
    except BaseException as e:
        why = e if isinstance(e, KeyboardInterrupt) else \
            _stop(came or distributed.peer_stopped()) if isinstance(e, Exception) else None
        if why is None:
            raise
        if main:
            then = (f"{checkpoint} holds step {state.saved}: rerun the stage to resume there" if resume and state.saved
                    else "a rerun starts over" + ("" if resume else " (train.resume is false)"))
            how = " (SIGTERM)" if isinstance(why, Terminated) else ""
            print(f"{name}: stopped at step {state.step}/{total}{how}; {then}", file=sys.stderr, flush=True)
        if why is e:
            raise
        raise why from e
    finally:
        for sig in ours:
            signal.signal(sig, defaults[sig])


def _stop(signum: int | None) -> KeyboardInterrupt | None:
    """The exception that stops training on `signum`; None for no signal."""
    return None if signum is None else Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
