"""The Serve application: ``Ingress`` (FastAPI, HTTP + WebSocket) in front of ``Generator``.

    serve run serve.app:build_app                          # untrained tiny model, seed 0
    serve run serve.app:build_app checkpoint=runs/ckpt     # a trained checkpoint (path or fsspec URI)
    serve run serve.app:build_app dtype=float32            # float32 on a GPU too (auto: bf16 on CUDA)
    serve deploy serve/config.yaml                         # on a running cluster

Every argument of :class:`AppArgs` can be given as ``key=value`` to ``serve run`` or under
``args:`` in serve/config.yaml.
"""

import logging
import os
import sys
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from .api import create_api
from .auth import KeyRing, check_bind, install_log_redaction, load_key_ring, serve_http_host
from .context import ApiContext, Limits
from .generator import Generator, GeneratorSettings
from .live import Broadcaster, get_hub
from .modeling import ModelSpec
from .proxy_mode import ProxyMode, apply_env, check_cluster
from .sessions import BankClient, BankConfig, check_layout

logger = logging.getLogger("serve.app")
REPO_UI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui")


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="Checkpoint dir/URI; none = untrained preset model.")
    preset: Literal["tiny", "small", "base"] = Field("tiny", description="Preset of the untrained model.")
    seed: int = Field(0, description="Seed of the untrained model's weights.")
    model_name: str = "bwr-dnc"
    storage: str = Field("runs/serve-storage", description="Session-bank storage: local dir or fsspec URI.")
    bank_shards: int = Field(2, ge=1, le=256)
    memory_budget_mb: float = Field(256.0, gt=0, description="Bank bytes each shard keeps in memory.")
    session_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    manager_interval_s: float = Field(5.0, ge=0, description="Memory-manager period (0 = off).")
    auto_compact: bool = True
    compact_idle_s: float = Field(30.0, ge=0)
    snapshot_every_turns: int = Field(32, ge=1, description="A session turn logs its tokens; every this many "
                                      "turns it writes the full state instead (1 = every turn, as before issue 14).")
    snapshot_every_tokens: int = Field(16384, ge=1, description="The same bound in tokens logged since the "
                                       "session's last full state.")
    resident_budget_mb: float = Field(1024.0, ge=0, description="Session states each Generator replica keeps "
                                      "resident between turns (LRU; 0 = fetch from the shard every turn).")
    namespace: str = "bwr-dnc"
    generator_replicas: int = Field(1, ge=1)
    generator_num_cpus: float = Field(1.0, ge=0)
    generator_num_gpus: float | None = Field(None, ge=0, description="None = 1 if the cluster has a GPU.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Serving dtype of the weights and session states: auto = bfloat16 on CUDA (about 3x "
        "faster decode steps than float32 on an H200), float32 on the CPU. Each logged turn records its dtype and "
        "replays in it (recovery, the shards' compaction on the CPU), so sessions survive a change of dtype.")
    torch_threads: int = Field(0, ge=0, description="torch threads per generator (0 = Ray's default).")
    max_batch_size: int = Field(64, ge=1, le=256, description="Rows of one decode model call (every running "
                                "request of a replica decodes; larger groups take several calls per step). "
                                "64 = the largest CUDA-graph decode bucket.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="How long a first request waits for others "
                                        "when the replica is idle (s). 0 (default): it prefills at once, and "
                                        "requests arriving meanwhile join at the next decode step; every wait "
                                        "is added to a lone request's latency.")
    stream_chunk_ms: float = Field(15.0, ge=0, le=1000, description="Shortest time between two streamed events "
                                   "of one request (ms); its first and last tokens go out at once.")
    stream_events_per_s: float = Field(500.0, ge=0, description="Streamed events per second one Generator "
                                       "replica sends in all: under load a request's events are max(stream_chunk_ms, "
                                       "running / this) apart, because each event costs CPU in the Generator, the "
                                       "Ray hop, the ingress and the proxy (0 = stream_chunk_ms at any load).")
    admit_batch: int = Field(8, ge=1, le=256, description="While rows decode, arrivals are admitted (prefilled "
                             "together) once this many wait, or once the oldest has waited admit_delay_ms; a request "
                             "that finds the replica idle is admitted at once. 1 = each arrival at the next step.")
    admit_delay_ms: float = Field(5.0, ge=0, le=1000, description="Longest wait of an arrival for others to "
                                  "be admitted with it while rows decode (ms); added to its time to first token.")
    admit_share: float = Field(0.0, ge=0, le=1, description="While rows decode, admissions that are not a full "
                               "admit_batch group are spaced so they take about this share of the model thread "
                               "(their measured cost); 0 = no spacing, the default (0.2 gained nothing on an H200 at 64 streams).")
    admit_max_delay_ms: float = Field(25.0, ge=0, le=1000, description="The longest that spacing holds an "
                                      "arrival back while rows decode (ms); added to its time to first token.")
    keep_stepping_ms: float = Field(0.0, ge=0, le=1000, description="The Generator's model thread runs decode "
                                    "iterations back to back for up to this long, handing tokens to the asyncio "
                                    "loop without waiting for it; research and health calls wait up to that long. "
                                    "0 = back to the loop after every iteration.")
    kv_attention: Literal["masked", "flex"] = Field("masked", description="The decode step's local attention: "
                                                    "'masked' reads every row's whole KV window, 'flex' only each "
                                                    "row's own length (flex_attention, compiled on CUDA; equal "
                                                    "outputs). 'masked' until an H200 run shows 'flex' faster.")
    generator_max_ongoing_requests: int = Field(
        256, ge=1, le=4096, description="Requests one Generator replica takes at once, streams included; all of "
        "them decode together (rows of the replica's scheduler). More wait in Serve's queue until one ends.")
    ingress_replicas: int = Field(1, ge=1, le=64, description="Ingress (HTTP) replicas. An ingress spends CPU per "
                                  "request and per streamed event, nearly all of it in Ray's request path (about 7 ms "
                                  "and 0.6 ms on a 2-core VM: bench/serve_load.py's CPU table); add replicas when one "
                                  "saturates its core and the host has idle ones (a second one on 2 busy cores only "
                                  "adds CPU).")
    ingress_one_loop: bool = Field(False, description="Run each ingress replica's FastAPI app and its handle to "
                                   "the Generator on the replica's main event loop (Ray's RAY_SERVE_RUN_USER_CODE_IN_"
                                   "SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 for the ingress only) "
                                   "instead of three loops on three threads, which hand every request and streamed "
                                   "event across threads under one GIL. false = Ray's default (no difference measured on a 2-core VM).")
    ingress_max_ongoing_requests: int = Field(
        1024, ge=1, le=65536, description="HTTP requests one ingress replica handles at once, open streams "
        "included; at least generator_max_ongoing_requests, so the ingress never caps the Generators.")
    max_new_tokens: int = Field(512, ge=1, le=4096)
    max_prompt_tokens: int = Field(8192, ge=1)
    max_research_tokens: int = Field(2048, ge=2)
    max_research_context_tokens: int = Field(4096, ge=1, description="efficiency-metrics context_tokens cap.")
    max_research_new_tokens: int = Field(128, ge=1, description="efficiency-metrics new_tokens cap.")
    research_concurrency_per_owner: int = Field(1, ge=1, description="Expensive research calls in flight "
                                                "per owner and ingress replica (429 beyond).")
    max_sessions_per_owner: int = Field(1000, ge=1, description="Sessions one owner may hold (429 beyond).")
    max_ws_per_owner: int = Field(8, ge=1, description="Open WebSockets per owner and ingress replica.")
    max_ws_total: int = Field(256, ge=1, description="Open WebSockets per ingress replica in all.")
    api_keys_file: str | None = Field(None, description="File (path or fsspec URI) of owner:key lines; adds "
                                                        "to $DNC_API_KEYS. Keys are required beyond loopback.")
    allowed_origins: list[str] = Field(default_factory=list, description="Browser origins allowed besides "
                                       "the server's own (CORS and the WebSocket Origin check); '*' = any.")
    proxy: ProxyMode | None = Field(None, description="What takes HTTP in front of the Ingress: Ray's Python proxy "
                                    "actor (python) or HAProxy (haproxy: a C load balancer on the port, the Ingress "
                                    "replicas serving HTTP themselves; HTTP only, SSE and WebSockets pass). A setting of "
                                    "the Ray cluster, read when it starts: applied to a local cluster this process "
                                    "starts, checked against a running one; null = as the cluster was started (Ray's "
                                    "default: python). serve/proxy_mode.py; docs/serving-performance.md.")
    ray_throughput_optimized: bool | None = Field(None, description="Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED "
                                                  "bundle (gRPC between deployments, one loop per replica, GC frozen "
                                                  "after start); like proxy, a setting of the cluster (null = as it "
                                                  "was started).")
    http_host: str = Field("127.0.0.1", description="Host the HTTP proxy binds when build_app starts Serve "
                                                    "itself; a running Serve instance's own host wins.")
    runs_root: str = Field("runs", description="Training runs the UI's monitor follows (dirs with metrics.jsonl).")
    ui_dir: str | None = Field(REPO_UI, description="Static UI folder served at /ui (none = no UI).")
    live_interval_s: float = Field(2.0, gt=0)

    @field_validator("storage", "runs_root")
    @classmethod
    def _abs_storage(cls, v: str) -> str:
        return v if "://" in v else os.path.abspath(os.path.expanduser(v))

    @field_validator("checkpoint", "ui_dir", "api_keys_file", "proxy", "ray_throughput_optimized", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return None if v in ("", "none", "None", "null") else v

    @model_validator(mode="after")
    def _ingress_fits_generators(self) -> "AppArgs":
        if self.ingress_max_ongoing_requests < self.generator_max_ongoing_requests:
            raise ValueError(f"ingress_max_ongoing_requests ({self.ingress_max_ongoing_requests}) is below "
                             f"generator_max_ongoing_requests ({self.generator_max_ongoing_requests}): the ingress "
                             "would cap the streams a Generator can run; raise it or lower the Generator's")
        return self

    # ---- derived settings -------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        return ModelSpec(checkpoint=self.checkpoint, preset=self.preset, seed=self.seed, dtype=self.dtype)

    def bank_config(self) -> BankConfig:
        return BankConfig(storage=self.storage, num_shards=self.bank_shards, namespace=self.namespace,
                          model=self.model_spec().to_dict(), memory_budget_bytes=int(self.memory_budget_mb * 2**20),
                          session_ttl_s=self.session_ttl_s, manager_interval_s=self.manager_interval_s,
                          auto_compact=self.auto_compact, compact_idle_s=self.compact_idle_s,
                          snapshot_every_turns=self.snapshot_every_turns, snapshot_every_tokens=self.snapshot_every_tokens,
                          resident_budget_bytes=int(self.resident_budget_mb * 2**20))

    def limits(self) -> Limits:
        return Limits(max_new_tokens=self.max_new_tokens, max_prompt_tokens=self.max_prompt_tokens,
                      max_research_tokens=self.max_research_tokens,
                      max_research_context_tokens=self.max_research_context_tokens,
                      max_research_new_tokens=self.max_research_new_tokens,
                      research_concurrency_per_owner=self.research_concurrency_per_owner,
                      max_sessions_per_owner=self.max_sessions_per_owner, max_ws_per_owner=self.max_ws_per_owner,
                      max_ws_total=self.max_ws_total)

    def generator_settings(self) -> GeneratorSettings:
        """What every Generator replica is built with (typed; Ray pickles it to the replicas)."""
        return GeneratorSettings(
            model=self.model_spec(), bank=self.bank_config(), hub_namespace=self.namespace,
            hub_name=self.hub_name(), device=self.device, max_batch_size=self.max_batch_size,
            batch_wait_timeout_s=self.batch_wait_timeout_s, torch_threads=self.torch_threads,
            model_name=self.model_name, max_ongoing_requests=self.generator_max_ongoing_requests,
            stream_chunk_ms=self.stream_chunk_ms, stream_events_per_s=self.stream_events_per_s,
            admit_batch=self.admit_batch, admit_delay_ms=self.admit_delay_ms, admit_share=self.admit_share,
            admit_max_delay_ms=self.admit_max_delay_ms, keep_stepping_ms=self.keep_stepping_ms,
            kv_attention=self.kv_attention)

    def hub_name(self) -> str:
        return f"dnc-live-hub-{self.bank_config().fingerprint()}"

    def num_gpus(self) -> float:
        if self.generator_num_gpus is not None:
            return self.generator_num_gpus
        try:
            import ray

            if ray.is_initialized():
                return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        except Exception:
            pass
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0


@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},  # build_app: AppArgs
                  graceful_shutdown_wait_loop_s=0.25,  # as the Generator (serve/generator.py): no 2 s idle poll
                  logging_config={"enable_access_log": False})  # serve/access_log.py writes ours
@serve.ingress()
class Ingress:
    """FastAPI ingress. Holds handles only (Generator, SessionBank shards, live hub); no model.
    ``key_digests``: SHA-256 of each API key -> owner (the keys themselves never reach the replica)."""

    def __init__(self, generator, a: AppArgs, key_digests: dict[str, str] | None = None):
        install_log_redaction()
        keys = KeyRing(dict(key_digests or {}))
        logger.info(check_bind(serve_http_host(a.http_host), keys))  # raises beyond loopback without keys
        bank_cfg = a.bank_config()
        hub_ns, hub_name = a.namespace, a.hub_name()
        self._hub = None

        def hub():
            if self._hub is None:
                self._hub = get_hub(hub_ns, hub_name)
            return self._hub
        self.ctx = ApiContext(generator=generator, bank=BankClient(bank_cfg), hub=hub, live=Broadcaster(),
                              limits=a.limits(), keys=keys,
                              allowed_origins=list(a.allowed_origins), model_name=a.model_name, ui_dir=a.ui_dir,
                              live_interval_s=a.live_interval_s, started=time.time(), runs_root=a.runs_root)

    def __serve_build_asgi_app__(self):
        return create_api(self.ctx)


INGRESS_ONE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
"""Ray Serve's switches (read when a replica process starts) that put a replica's user code and its
handles' router on the replica's main event loop; ``AppArgs.ingress_one_loop`` sets them for the
ingress replicas only (the Generator keeps its own loops; the proxies read them from the cluster's
environment)."""


def ingress_actor_options(a: AppArgs) -> dict[str, Any]:
    """The Ingress replicas' ``ray_actor_options``: no CPU reserved (it waits on I/O), and with
    ``ingress_one_loop`` the environment of :data:`INGRESS_ONE_LOOP_ENV` (Serve merges these
    ``env_vars`` into the application's ``runtime_env``)."""
    opts: dict[str, Any] = {"num_cpus": 0}
    if a.ingress_one_loop:
        opts["runtime_env"] = {"env_vars": dict(INGRESS_ONE_LOOP_ENV)}
    return opts


def start_serve(port: int = 8000, host: str = "127.0.0.1") -> None:
    """``serve.start`` for this app: HTTP on ``host:port``, and the proxies' per-request access log
    off (the ingress writes one line per request itself, none for polling: serve/access_log.py)."""
    serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})


def prepare_cluster(a: AppArgs) -> None:
    """The proxy mode (``a.proxy``, ``a.ray_throughput_optimized``) where Ray will read it: into this
    process's environment when no Ray runs here yet (a local cluster started from here inherits it),
    else checked against the running Serve controller (:class:`serve.proxy_mode.ProxyModeError`)."""
    import ray

    if not ray.is_initialized():
        apply_env(a.proxy, a.ray_throughput_optimized)
    else:
        check_cluster(a.proxy, a.ray_throughput_optimized)


def build_app(args: dict[str, Any]):
    """Application builder for ``serve run`` / ``serve deploy`` (see :class:`AppArgs`).

    Raises :class:`serve.auth.KeyConfigError` (one line) for malformed keys, or for a bind address
    beyond loopback without keys; :class:`serve.proxy_mode.ProxyModeError` when the running Serve
    uses another proxy mode than ``proxy``."""
    a = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    keys = load_key_ring(a.api_keys_file)
    prepare_cluster(a)
    print(f"[serve] {check_bind(serve_http_host(a.http_host), keys)}", file=sys.stderr, flush=True)
    check_layout(a.storage, a.bank_shards)
    # typed objects travel to the replicas (pickled by Ray), validated here once
    gen_settings = a.generator_settings()
    generator = Generator.options(
        num_replicas=a.generator_replicas, max_ongoing_requests=a.generator_max_ongoing_requests,
        ray_actor_options={"num_cpus": a.generator_num_cpus, "num_gpus": a.num_gpus()},
    ).bind(gen_settings)
    ingress = Ingress.options(num_replicas=a.ingress_replicas, max_ongoing_requests=a.ingress_max_ongoing_requests,
                              ray_actor_options=ingress_actor_options(a))
    return ingress.bind(generator, a, keys.digests)


def run_app(args: dict[str, Any] | AppArgs, port: int = 8000, name: str = "dnc", timeout_s: float = 300.0) -> str:
    """Start Serve on 127.0.0.1:``port`` (:func:`start_serve`), deploy this app under ``name`` and wait
    until ``/health`` answers 200 (a real forward pass), through the front ``args.proxy`` names (the
    cluster's mode: see :func:`prepare_cluster`). Returns the base URL. Raises TimeoutError
    after ``timeout_s`` seconds. Tests, benchmarks and the CLI start the app this one way."""
    import httpx
    import ray

    a = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    if not ray.is_initialized():  # serve.start would start a local cluster: with a's proxy mode
        apply_env(a.proxy, a.ray_throughput_optimized)
    start_serve(port)
    serve.run(build_app(a), name=name, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/health did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def wait_serve_gone(timeout_s: float = 180.0) -> bool:
    """Wait until Serve's controller actor is gone; False after ``timeout_s`` s. ``serve.shutdown``
    returns after 30 s even when the controller is still stopping (behind HAProxy each Ingress
    replica drains first: serve/proxy_mode.py), and a ``serve.start`` meanwhile joins the dying
    controller, whose deployments then fail."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # no such actor: gone
            return True
        time.sleep(0.5)
    logger.warning("Serve's controller still exists %.0f s after serve.shutdown()", timeout_s)
    return False


def teardown(args: dict[str, Any] | None = None) -> None:
    """Shut Serve down and remove this app's detached actors (shards, live hub); storage stays."""
    import ray

    a = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    serve.shutdown()
    wait_serve_gone()
    BankClient(a.bank_config()).kill_all()
    try:
        ray.kill(ray.get_actor(a.hub_name(), namespace=a.namespace), no_restart=True)
    except ValueError:
        pass
