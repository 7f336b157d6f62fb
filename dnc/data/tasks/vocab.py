"""The tasks' alphabet: special token ids, the key/value/copy alphabets, the filler words and the
relational task's names, and text <-> token id helpers. Filler never contains a digit or a capital,
so it can never collide with keys, values, passkeys, record ids or names."""

from __future__ import annotations

import numpy as np

from dnc.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
"""The byte tokenizer every task's tokens belong to."""
BOS = TOKENIZER.bos_id
EOS = TOKENIZER.eos_id
PAD = TOKENIZER.pad_id
SEP = TOKENIZER.sep_id
QUERY = TOKENIZER.token_id("<query>")
ANSWER = TOKENIZER.token_id("<answer>")
KEY = TOKENIZER.token_id("<key>")
NEEDLE = TOKENIZER.token_id("<needle>")
BLANK = TOKENIZER.token_id("<blank>")

KEY_ALPHABET = "ABCDEFGHIJKLMNOP"
"""16 letters keys are spelled with (kv_retrieval, mqar)."""
VALUE_ALPHABET = "0123456789"
"""10 digits values are spelled with (kv_retrieval, mqar)."""
COPY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""26 letters the copy task's strings are drawn from."""

WORDS: tuple[str, ...] = tuple(
    """the a of and to in is was for on that with as by at from it this be are or an which
    one all were when there can more if will about would their out up other into time some what
    so them these two may then first way could made over after like did many water long little
    very just where most know through back much before good new day also around another came
    come work three word must because does part even place well such here take why things help
    put years different away again off went old number great tell men say small every found still
    between name should home big give air line set own under read last never us left end along
    while might next sound below saw something thought both few those always looked show large
    often together asked house world going want school important until form food keep children
    feet land side without once animals life enough took four head above kind began almost live
    page got earth need far hand high year mother light country father let night picture being
    study second soon story since white ever paper hard near sentence better best across during
    today however sure knew try told young sun thing whole hear example heard several change
    answer room sea against top turned learn point city play toward five himself usually money
    seen car morning river garden bird music stone window table letter ocean quiet green""".split()
)
"""Filler vocabulary: common lower-case English words (no digits, no capitals, no "parent")."""

NAMES: tuple[str, ...] = tuple(
    """Ann Bob Cy Dee Eve Fay Gus Hal Ida Jay Kim Lou Max Ned Oli Pam Quin Ray Sue Tom Uma Val
    Wes Xia Yul Zed Abe Bea Cal Dot Eli Flo Gil Hope Ira Joy Ken Liv Mo Nia""".split()
)
"""Person names of the relational task (capitalised, distinct, never in the filler)."""


def encode_text(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids ``[len(bytes)]``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_ids(ids: np.ndarray) -> str:
    return TOKENIZER.decode(ids.tolist())
