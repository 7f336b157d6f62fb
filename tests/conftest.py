"""Shared fixtures. One real local Ray cluster per test session (``ray.init(num_cpus=2)``; under
``pytest -n 2`` each xdist lane is a session with its own cluster), started lazily by the tests that ask
for it; pure-model tests never start Ray. The lanes' groups: lane_group."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every Ray cluster the tests start (the session fixture's, and those of the `dnc demo` and `ray start`
# subprocesses, which inherit this environment) reads this when it starts: Ray Train's controller
# polls its workers every 0.5 s, not 2 s, so each run's end and each dead worker are noticed up to
# 1.5 s sooner (a missed poll is not a failure; a worker is declared dead after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). (RAY_metrics_report_interval_ms stays Ray's 10 s
# here: at 2 s test_metrics never saw the dnc_queue_depth and dnc_running_requests gauges exported.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Keep CPU tests deterministic and light on a 2-core machine. Under `pytest -n N` (make test runs two
# xdist lanes) each lane is its own process: N lanes share the cores, so each takes its share, not
# two threads each (two lanes x two threads on two cores made every op wait; see one_torch_thread).
_LANES = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _LANES))
torch.set_num_threads(_THREADS)
if _LANES > 1:  # and the subprocesses a lane starts (dnc demo/train/serve, bench scripts) unless they say
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


def pytest_configure(config):
    """With xdist lanes, the controller makes Ray's auth token (~/.ray/auth_token) before the lanes
    start, if there is none yet (a fresh HOME, as .ci/run's): the first ``ray.init`` of each lane would
    otherwise write one at once, and a cluster started with the token the other lane overwrote turns its
    later clients away (401)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    from pathlib import Path

    if not (Path.home() / ".ray" / "auth_token").exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()  # what `ray get-auth-token --generate` does


def pytest_addoption(parser):
    parser.addoption("--serve-proxy", default=os.environ.get("DNC_SERVE_PROXY") or None,
                     choices=["python", "haproxy"],
                     help="proxy mode of the session's Ray cluster (serve/proxy_mode.py), so the Serve app "
                          "tests run behind it; default $DNC_SERVE_PROXY, else Ray's (python)")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, request):
    """A real local Ray cluster shared by every Ray test in the session, in the proxy mode of
    ``--serve-proxy`` (its environment is set before the cluster starts: Ray reads it then)."""
    import ray

    if not ray.is_initialized():
        from serve.proxy_mode import apply_env

        apply_env(request.config.getoption("--serve-proxy"))
        ray.init(
            # "local": a new cluster of this process's own, never the machine's last `ray start` one
            # (with None Ray joins it: a test of another xdist lane may have one running)
            address=os.environ.get("RAY_ADDRESS") or "local",
            num_cpus=2,
            # 2 GiB, not Ray's 30% of RAM: up to two lanes' clusters plus the subprocess clusters of
            # the demo/haproxy/job tests share this machine's 24 GB (the tests put a few MB at most)
            object_store_memory=2 * 1024**3,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"WANDB_MODE": "offline"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


# The port every module's Serve app listens on (one port, so that one Serve instance serves them all:
# serve_on). Its own variable for the UI tests: DNC_UI_TEST_PORT.
SERVE_PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
# The modules that deploy a Serve app on the session's cluster (serve_on). They run one after another,
# in this order (pytest_collection_modifyitems), so Serve starts once for all of them, not once each,
# and is shut down after the last: it sits idle through no other module. test_auth first: its
# in-process build_app test needs no Serve running (serve_off), which is then the case already.
SERVE_MODULES = ("test_auth.py", "test_abuse.py", "test_metrics.py", "test_serve.py", "test_serve_streaming.py",
                 "test_serve_timeline.py", "test_sessions_routing.py", "test_session_defects4_http.py",
                 "test_session_defects5_http.py",
                 "test_ui_browser.py")
# The port of the Serve instance this session started and keeps (serve_on); None when none is kept.
_KEPT_SERVE: dict[str, int | None] = {"port": None}


def _serve_controller_alive() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def serve_on(port: int = SERVE_PORT) -> None:
    """Serve running with its HTTP proxy on ``port`` (the ``ray_cluster`` fixture must be up). The
    Serve instance (controller and proxy actors) of the previous module is kept when it listens on
    ``port``: only apps come and go between modules (:func:`remove_app`), which spares a Serve start
    and a full shutdown per module. One on another port, or one this helper did not start, is shut
    down first, waiting until its controller is gone (a ``serve.start`` meanwhile would join the
    dying controller)."""
    from ray import serve

    from serve.app import start_serve, wait_serve_gone

    if _serve_controller_alive():
        if _KEPT_SERVE["port"] == port:
            return
        serve.shutdown()
        wait_serve_gone()
    _KEPT_SERVE["port"] = None
    start_serve(port)
    _KEPT_SERVE["port"] = port


def serve_off() -> None:
    """No Serve running on the session's cluster (for a test whose outcome depends on that); starts
    no Ray cluster."""
    import ray

    if not ray.is_initialized() or not _serve_controller_alive():
        return
    from ray import serve

    from serve.app import wait_serve_gone

    _KEPT_SERVE["port"] = None
    serve.shutdown()
    wait_serve_gone()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of the Serve modules (module fixtures have removed their apps by then),
    the Serve that serve_on kept is shut down, so that it does not sit idle through other modules."""
    yield
    if _KEPT_SERVE["port"] is not None and (nextitem is None or nextitem.path.name not in SERVE_MODULES):
        serve_off()


def remove_app(app_args: dict, name: str) -> None:
    """What :func:`serve.app.teardown` removes but Serve itself: the app and its detached bank shards
    and live hub (the next module starts clean). Serve stays up for the next Serve module
    (:func:`serve_on`; :func:`pytest_runtest_teardown` shuts it down after the last)."""
    import ray
    from ray import serve

    from serve.app import AppArgs
    from serve.sessions import BankClient

    a = AppArgs(**app_args)
    if _serve_controller_alive():
        serve.delete(name)  # returns once the app's replicas are gone (at once if it never was)
    BankClient(a.bank_config()).kill_all()
    try:
        ray.kill(ray.get_actor(a.hub_name(), namespace=a.namespace), no_restart=True)
    except ValueError:
        pass


def serve_app(app_args: dict, port: int, name: str, timeout_s: float = 180):
    """Generator for a module-scoped fixture: deploy the real Serve app with ``app_args`` on
    ``port`` (the ``ray_cluster`` fixture must be up), yield its base URL, remove it after (Serve
    stays up for the next module: :func:`serve_on`)."""
    from serve.app import run_app

    serve_on(port)
    try:  # an app that failed to come up is removed too: the next module's app takes its route
        run_app(app_args, port, name=name, timeout_s=timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        remove_app(app_args, name)


@pytest.fixture(scope="module")
def client(server):
    """An httpx client on the module's ``server`` fixture (the base URL of its Serve app)."""
    import httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test, then the previous count. Tiny models' CPU ops are too small
    to split, and on a busy 2-core machine (Ray's processes, another run) a second thread makes every
    op wait on it: a tiny forward over 8,192 tokens took 1.9 s on one thread and 25-34 s on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_config():
    from dnc.config import preset

    return preset("tiny")


# Lanes (`make test` runs `pytest -n 2 --dist loadgroup`): each group's tests run in one xdist worker,
# in collection order, and a worker gets the next group when it is nearly done. Every module is a group
# of its own, except the modules that must not run at once: the Serve modules share one Serve instance
# on one port in the session's cluster (serve_on), so they are one group. Everything else may run beside
# anything: the other modules that start things use their own fixed ports (demo 8211, serve_load 8127,
# haproxy 8128 and free ones), free ports and their own temp dirs (job_submit, ray_address), and every
# Ray cluster a test starts is a new local one ("local", never the machine's last `ray start`).
SERVE_GROUP = "serve"
# Seconds per group at the last serial CI run (session 17; the rest took under 34 s each): groups are
# handed out longest first, so that the long ones do not all land at the end of one lane.
GROUP_SECONDS = {SERVE_GROUP: 300, "test_demo.py": 141, "test_ray_train.py": 130, "test_serve_load.py": 51,
                 "test_memory_bank.py": 50, "test_job_submit.py": 45, "test_bench_long_context.py": 43,
                 "test_train.py": 39, "test_train_compile_batch.py": 38, "test_haproxy.py": 34}


def lane_group(nodeid: str) -> str:
    """The lane group of a test id ("tests/test_x.py::test_y[p]"): its module's file name, or
    SERVE_GROUP for the Serve modules."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SERVE_GROUP if name in SERVE_MODULES else name


@pytest.hookimpl(tryfirst=True)  # before xdist's own (a firstresult hook)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with lane_group as the groups. Not xdist_group marks: xdist 3.8.0 puts a
    mark's group into ``item._nodeid``, which pytest 9.2 no longer reads (a node id is ``item._id``),
    so marked tests were spread one by one and the Serve modules ran in both lanes at once."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane_group(nodeid)

        def _assign_work_unit(self, node) -> None:
            """xdist's, but every test of the group is sent, not the first of each id: schemathesis's
            parametrize gives its tests one id each on pytest 9.2 (test_training_runs' fuzz test: 3
            tests, one id), and xdist's sent that id's first index only, so 2 of the 3 never ran."""
            scope, work_unit = self.workqueue.popitem(last=False)
            self.assigned_work.setdefault(node, {})[scope] = work_unit
            pending = {nodeid for nodeid, done in work_unit.items() if not done}
            node.send_runtest_some([i for i, nodeid in enumerate(self.registered_collections[node])
                                    if nodeid in pending])

    return LaneScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    # the Serve modules together, at the place of the first, in SERVE_MODULES' order, each module's
    # tests in their own order (a stable sort)
    serving = [it for it in items if it.path.name in SERVE_MODULES]
    if serving:
        first = items.index(serving[0])
        rest = [it for it in items if it.path.name not in SERVE_MODULES]
        serving.sort(key=lambda it: SERVE_MODULES.index(it.path.name))
        items[:] = rest[:first] + serving + rest[first:]
    # in lanes, the longest groups first (a stable sort: each group's tests keep their order; xdist's
    # queue of groups follows the collection order: make test passes --no-loadscope-reorder, as the
    # reorder would put the groups of most tests first)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda it: -GROUP_SECONDS.get(lane_group(it.nodeid), 0))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
