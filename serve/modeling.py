"""The model as the serving layer sees it: how it is loaded, and how a session's state travels.

Everything here goes through ``dnc``'s public API (see dnc/API.md). Without a checkpoint the server
runs an *untrained* preset model whose weights are a pure function of ``(preset, seed)``, so the
Generator replicas and the SessionBank shards (which need the compressor weights to compact banks)
build identical models independently; ``weights_digest`` lets anyone check that.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dnc import state as dnc_state
from dnc.state import levels_of, state_meta, state_to_bytes  # noqa: F401  (serve's callers import them from here)


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from."""

    checkpoint: str | None = None
    """Checkpoint directory or fsspec URI written by ``dnc.checkpoint.save_checkpoint``."""
    preset: str = "tiny"
    """Preset of the untrained model used when ``checkpoint`` is None."""
    seed: int = 0
    """Seed of the untrained model's initialisation."""

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


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: ModelSpec, device: str = "auto") -> LoadedModel:
    """Build the model of ``spec`` in eval mode on ``device`` (``auto``: CUDA when present)."""
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
    digest = weights_digest(model)
    model.to(resolve_device(device))
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
def state_from_bytes(data: bytes | None, model):
    """A DNCState from a stored bank (``None`` = a fresh, empty state) on the model's device."""
    if data is None:
        return model.init_state(1)
    return dnc_state.state_from_bytes(data, model.config, device=model.device)


def kv_cache_bytes(config, context_tokens: int, bytes_per_elem: int = 4) -> int:
    """KV-cache bytes of the plain-Transformer baseline holding ``context_tokens`` (batch 1):
    K and V, every layer, ``d_model`` wide."""
    return 2 * config.n_layers * context_tokens * config.d_model * bytes_per_elem
