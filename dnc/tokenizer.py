"""Byte-level tokenizer with special tokens.

Ids 0..255 are raw UTF-8 bytes, so any text round-trips exactly. Ids 256.. are special tokens
(BOS, EOS, PAD, SEP and task markers); they never come out of ``encode`` on plain text.
An optional BPE tokenizer (``tokenizers`` package) can be trained on user files; the model only
needs ``vocab_size`` and the special ids, so either works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<sep>",
    "<query>",   # marks a question in the synthetic tasks
    "<answer>",  # the model must produce the answer after this marker
    "<key>",
    "<value>",
    "<needle>",
    "<fill>",    # filler / haystack marker
    "<blank>",   # fill-in-the-blank slot
    "<user>",    # chat roles for /v1/chat/completions
    "<assistant>",
    "<system>",
    "<reserved0>",
    "<reserved1>",
)
BYTE_VOCAB = 256


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes plus ``len(SPECIAL_TOKENS)`` special ids; ``vocab_size`` is 272."""

    name: str = "byte"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + len(SPECIAL_TOKENS)

    def token_id(self, special: str) -> int:
        """Id of a special token such as ``"<bos>"``; raises ``KeyError`` naming the valid ones."""
        try:
            return BYTE_VOCAB + SPECIAL_TOKENS.index(special)
        except ValueError:
            raise KeyError(f"unknown special token {special!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def pad_id(self) -> int:
        return self.token_id("<pad>")

    @property
    def bos_id(self) -> int:
        return self.token_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<eos>")

    @property
    def sep_id(self) -> int:
        return self.token_id("<sep>")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Bytes back to text. Special ids are dropped (or rendered by name); invalid UTF-8 from a
        partially generated multi-byte character becomes U+FFFD rather than raising."""
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < BYTE_VOCAB:
                out.append(i)
            elif not skip_special and BYTE_VOCAB <= i < self.vocab_size:
                parts.append(out.decode("utf-8", errors="replace"))
                out.clear()
                parts.append(SPECIAL_TOKENS[i - BYTE_VOCAB])
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return token_id >= BYTE_VOCAB


def get_tokenizer(name: str = "byte") -> ByteTokenizer:
    """The tokenizer by name. Only ``byte`` ships; a trained BPE file can be loaded with
    :func:`train_bpe` / ``tokenizers.Tokenizer.from_file`` by callers that need one."""
    if name != "byte":
        raise ValueError(f"unknown tokenizer {name!r}; use 'byte'")
    return ByteTokenizer()


def train_bpe(files: Sequence[str], vocab_size: int = 4096, out_path: str | None = None):
    """Train a byte-level BPE on local text files with the ``tokenizers`` package (optional extra
    ``bpe``). Special tokens keep the same names. Returns the ``tokenizers.Tokenizer``."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("BPE needs the 'tokenizers' package: pip install 'bwr-dnc[bpe]'") from e
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train(list(files), trainer)
    if out_path:
        tok.save(out_path)
    return tok
