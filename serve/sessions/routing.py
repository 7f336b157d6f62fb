"""Route a session's turns to the Generator replica that holds its state (issue 14).

A Ray Serve custom request router (``ray.serve.request_router``, Ray 2.60, alpha API) for the
Generator deployment. A request whose first argument carries a ``state_id`` (a session turn, see
``serve.generator.GenRequest``) ranks the replicas by rendezvous hashing of the id: the replica
with the highest ``hash(state_id, replica)`` first, then the next. So a session keeps landing on
one replica (its state stays resident there) while that replica has room, spills to the next one
when it is full (at ``max_ongoing_requests``), and only the sessions of a replica that comes or
goes move. Other requests (sessionless generation, research, health) use the power of two choices
among the replicas, as Serve's default router does.

Affinity is an optimisation, never a correctness condition: any replica can serve any turn, since
the shard checks a resident copy's seq and digest before it is used (``begin_turn(have=...)``).

Why not model multiplexing (``@serve.multiplexed``): it would route by ``state_id`` too, but its
cache evicts by count, not bytes, it exports a Prometheus series per model id (one per session),
and it pushes the replica's id set to the controller whenever a session arrives.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "serve.sessions.routing:SessionAffinityRouter"
"""What ``RequestRouterConfig(request_router_class=...)`` names."""


def session_of(pending_request: Optional[PendingRequest]) -> str | None:
    """The ``state_id`` of a pending Generator request, or None (not a session turn)."""
    if pending_request is None or not pending_request.args:
        return None
    sid = getattr(pending_request.args[0], "state_id", None)
    return sid if isinstance(sid, str) and sid else None


def rank_replicas(state_id: str, replica_ids: List[str]) -> List[str]:
    """Replica ids by descending rendezvous score for ``state_id`` (stable across processes)."""
    def score(rid: str) -> bytes:
        return hashlib.blake2b(f"{state_id}|{rid}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=score, reverse=True)


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    """See the module docstring."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        sid = session_of(pending_request)
        if sid is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id: dict[str, Any] = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[i] for i in rank_replicas(sid, list(by_id))]
        return [[order[0]], [order[1]], order[2:]] if len(order) > 2 else [[order[0]], [order[1]]]
