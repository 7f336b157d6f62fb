"""The Serve side of ``dnc serve`` and ``dnc demo``: build the app (failing fast on bad arguments),
start Serve, deploy or redeploy the app, serve until a deadline or Ctrl-C, and tear it all down.

The app is built before Ray starts, so a malformed key, a non-loopback bind without keys or a bad
``AppArgs`` field fails in a second with one line (:class:`UsageError`), not after a cluster start.
"""

from __future__ import annotations

import time
from typing import Any

from ray_jobs.parsing import UsageError
from ray_jobs.signals import stop_on_sigterm

APP_NAME = "bwr-dnc"


def checked_app(args: dict[str, Any]):
    """``serve.app.build_app(args)``; argument errors become one-line :class:`UsageError`."""
    from pydantic import ValidationError

    from serve.app import build_app
    from serve.auth import KeyConfigError
    from serve.proxy_mode import ProxyModeError

    try:
        return build_app(args)
    except (KeyConfigError, ProxyModeError) as e:
        raise UsageError(str(e)) from None
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "argument"
        raise UsageError(f"{field}: {first.get('msg', e)}") from None


def check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")


# Serve kills a proxy that fails its ready check (5 s by default) three times, and serve.start then
# raises. On 2 busy cores a proxy's start (its imports) took longer than those 15 s, so `dnc serve`
# died at start; a local cluster gets more time (its processes inherit this environment).
PROXY_READY_CHECK_TIMEOUT_S = "30"


def start(port: int) -> None:
    """Ray (local unless RAY_ADDRESS) and Serve's HTTP proxy on 127.0.0.1:``port``, with the proxies'
    per-request access log off (``serve.app.start_serve``)."""
    import os

    import ray

    from serve.app import start_serve

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_CHECK_TIMEOUT_S)
        # "local": not the machine's last `ray start` cluster (ray_jobs.train.init_ray says why)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
        stop_on_sigterm()  # ray.init replaced it with Ray's (ray_jobs.signals)
    start_serve(port)


def check_proxy(proxy: str | None) -> None:
    """A RAY_ADDRESS cluster keeps the proxy mode it was started with: a different ``proxy`` is a
    one-line :class:`UsageError` (a local cluster took it from this process's environment)."""
    from serve.proxy_mode import ProxyModeError, check_cluster

    try:
        check_cluster(proxy)
    except ProxyModeError as e:
        raise UsageError(str(e)) from None


def deploy(app) -> None:
    """Deploy ``app`` (or replace the running one: a new checkpoint), returning once it is up."""
    from ray import serve as ray_serve

    ray_serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def print_links(port: int) -> None:
    print(f"\nBWR-DNC is serving: UI http://127.0.0.1:{port}/ui  API docs http://127.0.0.1:{port}/docs", flush=True)
    print("Ctrl-C stops it.", flush=True)


def wait(seconds: float | None) -> None:
    """Sleep until ``seconds`` have passed (None: forever); Ctrl-C ends it quietly."""
    deadline = time.time() + seconds if seconds else None
    try:
        while deadline is None or time.time() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)


def stop(args: dict[str, Any]) -> None:
    """Serve and this app's detached actors gone, then Ray; nothing when Ray is already down
    (a Ctrl-C during training shut it down)."""
    import ray

    if not ray.is_initialized():
        return
    from serve.app import teardown

    try:
        teardown(args)
    finally:
        ray.shutdown()


FLAG_ARGS = {"checkpoint": "--checkpoint", "storage": "--storage", "dtype": "--dtype", "proxy": "--proxy"}
"""App arguments ``dnc serve`` takes as flags of their own: given in ``--app`` too they are refused, so a
flag's default never silently overrides the mapping's value."""


def serve_app_args(checkpoint: str | None, storage: str, dtype: str, proxy: str | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The app arguments of ``dnc serve``: its flags plus ``--app``'s mapping (:class:`serve.app.AppArgs`
    fields, validated by :func:`checked_app`)."""
    if extra is not None and not isinstance(extra, dict):
        raise UsageError(f"--app takes a mapping of app arguments, e.g. '{{kv_attention: flex}}'; got {extra!r}")
    extra = dict(extra or {})
    clash = sorted(k for k in extra if k in FLAG_ARGS)
    if clash:
        raise UsageError(f"--app: {', '.join(clash)} set by flags of their own: use "
                         f"{', '.join(FLAG_ARGS[k] for k in clash)} instead")
    args: dict[str, Any] = {**extra, "storage": storage, "dtype": dtype, "proxy": proxy}
    if checkpoint:
        args["checkpoint"] = checkpoint
    return args


def serve_forever(checkpoint: str | None, port: int, seconds: float | None, storage: str,
                  dtype: str = "auto", proxy: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """``dnc serve``: one app from ``checkpoint`` (None: an untrained tiny model) in ``dtype``, behind
    ``proxy`` (``python`` | ``haproxy``: set in this process's environment by ``checked_app``, before
    :func:`start` starts the local cluster that reads it), with ``extra`` app arguments (``--app``)."""
    args = serve_app_args(checkpoint, storage, dtype, proxy, extra)
    check_port(port)
    app = checked_app(args)
    try:
        start(port)
        check_proxy(proxy)
        deploy(app)
        print_links(port)
        wait(seconds)
    finally:
        stop(args)
