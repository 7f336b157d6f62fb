"""Seeded synthetic tasks for long-range reasoning, built with numpy so that a 1M-token sample
takes milliseconds.

Every generator has the signature ``fn(rng, length, difficulty=0.5, **kw) -> Sample``:

- ``rng``: a ``numpy.random.Generator`` (or an int seed). The same rng state gives the same sample.
- ``length``: total tokens of the sample, answer and ``<eos>`` included. It is exact:
  ``len(sample.tokens) == length``. The distance the model must bridge grows with it, because the
  slack is filled with deterministic pseudo-text (words from :data:`WORDS`, never downloaded).
- ``difficulty``: a float in ``[0, 1]``; each task maps it to its own knobs (table below).
  Knobs chosen from ``difficulty`` shrink until the sample fits ``length``; knobs passed explicitly
  as keyword arguments never shrink: if they cannot fit, a ``ValueError`` says the minimum length.

Layout (``<x>`` are special tokens of :class:`dnc.tokenizer.ByteTokenizer`, the rest UTF-8 bytes;
``...`` is filler, ``[...]`` marks the answer, which is the only part in ``loss_mask``):

============  =====================================================================  ===============================================
task          layout                                                                 difficulty 0 -> 1
============  =====================================================================  ===============================================
copy          ``<bos><key>S<sep> ... <query><answer>[S<eos>]``                       ``len(S)`` 4 -> 32
kv_retrieval  ``<bos>(<key>KV)*n ... <sep> ... <query>K[V<eos>]``                    ``n_pairs`` 2 -> 32, ``value_len`` 1 -> 4
fill_blank    records ``"ABC: w1 w2 w3.\\n"`` in filler, then                         ``n_records`` 1 -> 8, ``n_words`` 3 -> 6
              ``<query>ABC: w1 <blank> w3.<answer>[w2<eos>]``
needle        ``<needle>the pass key is 12345.`` at ``depth``, decoys, then          ``n_decoys`` ("the room number is 48213.") 0 -> 4
              ``<query>the pass key is [12345<eos>]``
relational    facts ``"Ann is the parent of Bob."`` in filler, then                   ``hops`` 1 -> 3, extra people 0 -> 6
              ``<query>who is the grandparent of Cy?<answer>[Ann<eos>]``
mqar          ``<bos>(<key>KV)*n<sep> ... (<query>K[V])*q[<eos>]``                    ``n_pairs`` 2 -> 32 (``n_queries`` = ``n_pairs``)
============  =====================================================================  ===============================================

Alphabets (small on purpose, so a tiny model can learn the tasks):

- keys (kv_retrieval, mqar): :data:`KEY_ALPHABET`, 16 upper-case letters ``A..P``; a key is
  ``key_len`` of them (kv_retrieval: 2, i.e. 256 distinct keys; mqar: 1 up to 16 pairs, else 2).
  Keys within a sample are distinct.
- values (kv_retrieval, mqar): :data:`VALUE_ALPHABET`, the 10 digits; a value is ``value_len`` of them.
- copy strings: :data:`COPY_ALPHABET`, the 26 upper-case letters.
- filler: lower-case words from :data:`WORDS`, no digits and no upper case, so it never collides
  with keys, values, passkeys, record ids or names.

Generalisation (issue 11): the retrieval tasks (needle, kv_retrieval, relational, mqar) also take
``phrasing`` (``"train"`` / ``"heldout"`` wordings of :mod:`dnc.data.phrasings`, ``"mixed"`` = the
original template or a train one), ``markers=False`` (no ``<needle>``/``<key>``/``<sep>``/``<query>``/
``<answer>``; ``marker_prob=p`` keeps them with probability ``p``) and ``filler`` (``"words"``, real
text ``"stdlib"`` / held-out ``"stdlib_heldout"`` from :mod:`dnc.data.filler_text`, or ``"mixed"``).
Real-text filler has digits and capitals, so it may by chance hold a key-like string; the defaults
(template, markers, words) reproduce the layouts above sample for sample. Each sample records its
wording in ``meta["phrasing"]``, ``meta["markers"]``, ``meta["filler"]`` (and ``meta["frames"]``).

The answer always ends with ``<eos>``; invariants every sample satisfies:
``sample.tokens[sample.loss_mask] == sample.answer`` and ``sample.loss_mask[sample.answer_start]``.

Where things are: :mod:`~dnc.data.tasks.vocab` (token ids, alphabets, words),
:mod:`~dnc.data.tasks.builder` (:class:`Sample`, filler, the sample builder),
:mod:`~dnc.data.tasks.retrieval` (kv_retrieval, mqar, needle), :mod:`~dnc.data.tasks.reasoning`
(copy, fill_blank, relational), :mod:`~dnc.data.tasks.registry` (:data:`TASKS`, :func:`generate`),
:mod:`~dnc.data.tasks.scoring` (:func:`score`, :func:`predict_answer`) and
:mod:`~dnc.data.tasks.batching` (:func:`collate`). Import the names from here.
"""

from __future__ import annotations

from dnc.data.tasks.batching import collate
from dnc.data.tasks.builder import Sample, TaskGenerator, filler
from dnc.data.tasks.reasoning import copy_task, fill_blank, relational
from dnc.data.tasks.registry import TASKS, generate
from dnc.data.tasks.retrieval import kv_retrieval, mqar, needle
from dnc.data.tasks.scoring import PredictFn, predict_answer, score
from dnc.data.tasks.vocab import (ANSWER, BLANK, BOS, COPY_ALPHABET, EOS, KEY, KEY_ALPHABET, NAMES,
                                  NEEDLE, PAD, QUERY, SEP, VALUE_ALPHABET, WORDS)

__all__ = [
    "Sample", "TaskGenerator", "TASKS", "generate", "score", "predict_answer", "collate", "filler",
    "copy_task", "kv_retrieval", "fill_blank", "needle", "relational", "mqar",
    "KEY_ALPHABET", "VALUE_ALPHABET", "COPY_ALPHABET", "WORDS", "NAMES", "PredictFn",
    "BOS", "EOS", "PAD", "SEP", "QUERY", "ANSWER", "KEY", "NEEDLE", "BLANK",
]
