"""SIGTERM stops a ``dnc`` command the way one Ctrl-C does.

``kill``, systemd and Kubernetes stop a process with SIGTERM. By default that kills the driver at
once: ``ray.init`` installs Ray's own handlers (a ``sys.exit`` in Python, and a failure-signal
handler in its core worker that aborts the process), and the local cluster's dashboard and
runtime-env agents are left running. Raising :class:`Terminated`, a ``KeyboardInterrupt``, instead
sends SIGTERM down every clean-up path a Ctrl-C already takes: Serve and this app's actors torn
down, a training run stopped, ``ray.shutdown()``.
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def stop_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread. Call it again after ``ray.init``,
    which replaces the handler with Ray's (a no-op outside the main thread, where Python cannot set
    handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
