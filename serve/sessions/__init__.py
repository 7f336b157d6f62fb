"""The session store: session banks in sharded, named Ray actors, with durable storage and a memory
manager (issue 13: one module per job).

A session (``state_id``) lives in exactly one shard, chosen by a stable hash of its id. A shard keeps
each session's serialized bank (``DNCState.export()`` as safetensors bytes), owner, history and the
seq of its last applied update; acknowledges an update only once its WAL record is durable; and
restores every session from snapshots + WAL when Ray reruns its ``__init__``.

* :mod:`.config` - ``BankConfig``, ``shard_index``, ``check_layout``;
* :mod:`.session` - one session's record;
* :mod:`.state_machine` - create/read/delete, turns, leases (TTL + fencing), the ordered idempotent
  update queue;
* :mod:`.durability` - start with retries, recovery with damage detection, WAL appends, snapshots,
  checkpoints (the byte formats are in :mod:`serve.bank_store`);
* :mod:`.manager` - compaction, TTL cleanup, offload, checkpoint triggers (background);
* :mod:`.shard` - ``SessionBankShard``, assembled from the three above;
* :mod:`.client` - ``BankClient``: routes calls to shard actors, re-resolves dead handles, keeps a
  turn's lease alive;
* :mod:`.turn_log` - token turn records: ids, digest chain, state fingerprints, replay (issue 14);
* :mod:`.resident` - the LRU of session states a Generator replica keeps on its device;
* :mod:`.turns` - ``SessionTurns``: a session turn as the Generator runs it (lease, resident or
  rebuilt state, commit of tokens or of a snapshot);
* :mod:`.routing` - ``SessionAffinityRouter``: the Generator deployment's request router (a session's
  turns go to the replica holding its state).
"""

from .client import BankClient, LocalBankClient
from .config import BankConfig, check_layout, shard_index
from .session import Session
from .shard import SessionBankShard

__all__ = ["BankClient", "LocalBankClient", "BankConfig", "Session", "SessionBankShard", "check_layout", "shard_index"]
