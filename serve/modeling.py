"""The model as the serving layer sees it: how it is loaded, and how a session's state travels.

Everything here goes through ``dnc``'s public API (see dnc/API.md). Without a checkpoint the server
runs an *untrained* preset model whose weights are a pure function of ``(preset, seed)``, so the
Generator replicas and the SessionBank shards (which need the compressor weights to compact banks)
build identical models independently; ``weights_digest`` lets anyone check that.

The serving dtype (``ModelSpec.dtype``): the weights are cast to it once loaded, and a session's
state lives in it. ``auto`` is bfloat16 on CUDA (about 3x faster decode steps on an H200) and
float32 on the CPU (exact, and CPU bf16 matmuls gain little). A replay of a logged turn runs in the
dtype the turn was decoded in (``serve.sessions.turn_log.ReplayModels``), whatever this replica serves.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dnc.state import DNCState, export_from_bytes
from dnc.state import levels_of, state_meta, state_to_bytes  # noqa: F401  (serve's callers import them from here)


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Dtypes a model can be served (and a turn replayed) in, by name."""
SERVE_DTYPES = ("auto", *DTYPES)


def check_dtype(dtype: str, allow_auto: bool = True) -> str:
    """``dtype`` if it names a serving dtype; else ValueError saying which ones do."""
    names = SERVE_DTYPES if allow_auto else tuple(DTYPES)
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)} (got {dtype!r})")
    return dtype


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """The dtype name a model on ``device`` runs in: ``auto`` = bfloat16 on CUDA, float32 elsewhere."""
    check_dtype(dtype)
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return dtype


def dtype_name(x) -> str:
    """Name of the float dtype of a model (its parameters), a tensor or a torch.dtype: ``"bfloat16"``."""
    if isinstance(x, torch.nn.Module):
        x = next(x.parameters())
    if isinstance(x, torch.Tensor):
        x = x.dtype
    return str(x).removeprefix("torch.")


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from, and the dtype they are served in."""

    checkpoint: str | None = None
    """Checkpoint directory or fsspec URI written by ``dnc.checkpoint.save_checkpoint``."""
    preset: str = "tiny"
    """Preset of the untrained model used when ``checkpoint`` is None."""
    seed: int = 0
    """Seed of the untrained model's initialisation."""
    dtype: str = "auto"
    """Serving dtype: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32`` or ``bfloat16``."""

    def __post_init__(self):
        check_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return self.checkpoint or f"untrained {self.preset} (seed {self.seed})"


@dataclass
class LoadedModel:
    model: Any  # dnc.model.DNC
    spec: ModelSpec
    extra: dict[str, Any] = field(default_factory=dict)
    digest: str = ""

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> str:
        """The dtype the weights were cast to (``"float32"`` / ``"bfloat16"``)."""
        return dtype_name(self.model)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: ModelSpec, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """Build the model of ``spec`` in eval mode on ``device`` (``auto``: CUDA when present), its
    weights cast to ``dtype`` (None: ``spec.dtype``). The copies a replay needs in another dtype are
    loaded this way too: from the source weights, never by casting a served bfloat16 copy back up."""
    from dnc.checkpoint import load_checkpoint
    from dnc.config import preset
    from dnc.model import DNC

    if spec.checkpoint:
        model, extra = load_checkpoint(spec.checkpoint, map_location="cpu")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = DNC(preset(spec.preset))
        extra = {}
    model.eval()
    digest = weights_digest(model)  # of the weights as stored: the same for every serving dtype
    dev = resolve_device(device)
    model.to(device=dev, dtype=DTYPES[resolve_dtype(dtype or spec.dtype, dev)])
    if model.device.type == "cuda":
        model.enable_cuda_graphs()  # prompts are prefilled a whole segment per graph launch
    return LoadedModel(model, spec, dict(extra or {}), digest)


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- session state
def state_from_bytes(data: bytes | None, model, dtype: str | None = None):
    """A DNCState from a stored bank (``None`` = a fresh, empty state) on the model's device, its
    float tensors in ``dtype`` (None: the model's; ``"stored"``: the dtype the bytes hold)."""
    export = export_from_bytes(data) if data is not None else None
    if dtype is None or (dtype == "stored" and export is None):
        dtype = dtype_name(model)
    elif dtype == "stored":
        dtype = stored_dtype(export)
    if export is None:
        return model.init_state(1, dtype=DTYPES[check_dtype(dtype, allow_auto=False)])
    return DNCState.from_export(export, model.config, device=model.device, dtype=DTYPES[check_dtype(dtype, False)])


def stored_dtype(export: dict[str, Any]) -> str:
    """The dtype a stored state's tensors were saved in (its local KV cache's), from an export dict.
    A state is saved in the dtype it was decoded in (safetensors keeps tensor dtypes)."""
    k = export.get("cache.0.k")
    return dtype_name(k) if isinstance(k, torch.Tensor) else "float32"


def state_dtype(state) -> str:
    """The dtype a DNCState's float tensors are in (its local KV cache's)."""
    return dtype_name(state.layers[0].cache.k)


def kv_cache_bytes(config, context_tokens: int, bytes_per_elem: int = 4) -> int:
    """KV-cache bytes of the plain-Transformer baseline holding ``context_tokens`` (batch 1):
    K and V, every layer, ``d_model`` wide."""
    return 2 * config.n_layers * context_tokens * config.d_model * bytes_per_elem
