"""BWR-DNC model library: pure PyTorch, never imports Ray. See dnc/API.md for the public API."""

from .config import ConfigError, DNCConfig, preset
from .tokenizer import ByteTokenizer, get_tokenizer

__all__ = ["ConfigError", "DNCConfig", "preset", "ByteTokenizer", "get_tokenizer"]
__version__ = "0.1.0"
