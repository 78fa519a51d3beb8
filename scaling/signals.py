"""The stop signals: SIGTERM (what a preempted VM or a scheduler sends) and Ctrl-C."""

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(handler):
    """`handler(signum, frame)` handles the stop signals while the block runs; the previous
    handlers come back after it. Only the main thread receives signals, so elsewhere (a sweep
    run from a thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
