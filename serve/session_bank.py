"""Compatibility alias: the session store lives in :mod:`serve.sessions` (one module per job).

``from serve.session_bank import BankClient, BankConfig, SessionBankShard, shard_index, check_layout``
keeps working. Ray actors created before the split were registered under this module's
``SessionBankShard``; it is the same class.
"""

from .sessions import BankClient, BankConfig, Session, SessionBankShard, check_layout, shard_index

_Session = Session  # the pre-split private name

__all__ = ["BankClient", "BankConfig", "Session", "SessionBankShard", "check_layout", "shard_index"]
