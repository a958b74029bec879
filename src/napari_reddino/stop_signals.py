"""Signal handlers for the span of a long command: Ctrl-C, and a scheduler's SIGTERM."""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def handling_signals(handler: Callable, signals=(signal.SIGINT, signal.SIGTERM), *,
                     keep_ignored: bool = True) -> Iterator[bool]:
    """Call ``handler(signum, frame)`` for ``signals`` inside the block, and put the earlier
    handlers back after it. Only the main thread can take over signals: elsewhere nothing changes,
    and the block gets False. ``keep_ignored``: a signal ignored when the block begins (Ctrl-C
    in a job a script sent to the background with ``&``) stays ignored, as the shell meant it to."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {number: signal.signal(number, handler) for number in signals
                if not keep_ignored or signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield True
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)
