"""The hierarchical memory: StateBank (levels L0/L1/L2), LearnedCompressor, LevelRouter,
MemoryRead and the eviction policies."""

from .bank import BankLevel, StateBank, LEVELS
from .compressor import LearnedCompressor, reconstruction_loss
from .eviction import POLICIES, EvictionPolicy, get_policy
from .read import MemoryRead, ReadView
from .router import LevelRouter

__all__ = ["BankLevel", "StateBank", "LEVELS", "LearnedCompressor", "reconstruction_loss", "POLICIES",
           "EvictionPolicy", "get_policy", "MemoryRead", "ReadView", "LevelRouter"]
