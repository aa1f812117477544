"""The one place Redis key names of the control plane are built: `RedisKeys(cluster)`.

Every key lives under `kvrelay:{<cluster name>}:` (ClusterConfig.name), so several kvrelay
clusters can share one Redis (an operator's common Redis, two test clusters) without seeing
each other's workers, loads or cached blocks. The braces make the name a Redis Cluster hash
tag: one cluster's keys share a slot, so its multi-key calls (`drop_worker`'s DELETE, the KV
events' MULTI) work on a sharded Redis too. A name with a brace is refused: it could end the
tag early and make one cluster's keys look like another's.

Per worker, `worker_key(kind, worker_id)` is `kvrelay:{name}:<kind>:<worker_id>` with kind
one of WORKER_KINDS (redis_plane.py says what each holds); `epoch` is the cluster's marker
that Redis still holds its state. The control plane uses no pub/sub channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.errors import InvalidParameter

ROOT = "kvrelay"
WORKER_KINDS = ("held", "root", "worker", "load")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class RedisKeys:
    cluster: str
    """The cluster's name (ClusterConfig.name)."""

    def __post_init__(self) -> None:
        if not self.cluster or "{" in self.cluster or "}" in self.cluster:
            raise InvalidParameter("name", f"cluster name {self.cluster!r}: a Redis control "
                                   "plane needs a non-empty name without braces")

    @property
    def prefix(self) -> str:
        return f"{ROOT}:{{{self.cluster}}}"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    def worker_key(self, kind: str, worker_id: str) -> str:
        assert kind in WORKER_KINDS, kind
        return f"{self.prefix}:{kind}:{worker_id}"

    def worker_pattern(self, kind: str) -> str:
        """A SCAN MATCH pattern of every `kind` key of this cluster (the name's glob
        characters escaped)."""
        return _GLOB_SPECIAL.sub(r"\\\1", self.worker_key(kind, "")) + "*"

    def worker_id(self, kind: str, key: bytes | str) -> str:
        """The worker id of one of this cluster's `kind` keys."""
        key = key.decode() if isinstance(key, bytes) else key
        return key[len(self.worker_key(kind, "")):]
