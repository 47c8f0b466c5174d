"""The one owner of jobgate's Redis key and channel names.

Every key shares the hash tag ``{<namespace>}`` so that the multi-key Lua scripts stay in one slot
and the design survives Redis Cluster. Scripts receive the keys a call names in KEYS (the
namespace's own keys first, :meth:`Keys.namespace_keys`); keys named after ids a script reads from
Redis (jobs of a worker, workers of a queue) are built in Lua from :attr:`Keys.prefix` by the key
functions of ``lua/_common.lua``, which follow the same rules as this module (a test holds the two
together); ``docs/PROTOCOL.md`` writes the rules down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KIND_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # no ":": worker:<id> and worker:<id>:jobs must not meet


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel builders for one namespace (default ``jobgate``)."""

    namespace: str = "jobgate"

    def __post_init__(self) -> None:
        if not NAMESPACE_RE.fullmatch(self.namespace):
            raise ValueError(f"namespace must match {NAMESPACE_RE.pattern}")

    @property
    def prefix(self) -> str:
        """Common prefix of every key, including the hash tag: ``{jobgate}:``."""
        return "{" + self.namespace + "}:"

    def namespace_keys(self) -> list[str]:
        """The keys every state-changing script receives first, as KEYS[1..7], in this order."""
        return [
            self.queues(),
            self.seq(),
            self.lease_seq(),
            self.acks(),
            self.cancels(),
            self.workers(),
            self.results_channel(),
        ]

    def own_keys(self, worker_id: str) -> list[str]:
        """The keys the scripts a worker calls receive after :meth:`namespace_keys`, as KEYS[8..9]."""
        return [self.worker(worker_id), self.worker_jobs(worker_id)]

    # --- jobs -----------------------------------------------------------------------------
    def job(self, job_id: str) -> str:  # hash
        return f"{self.prefix}job:{job_id}"

    def pending(self, queue: str, kind: str) -> str:  # zset: job id -> priority/sequence score
        return f"{self.prefix}pending:{queue}:{kind}"

    def queue_kinds(self, queue: str) -> str:  # set: kinds that may have jobs waiting in the queue
        return f"{self.prefix}kinds:{queue}"

    def queues(self) -> str:  # set: queue names that may hold waiting jobs
        return f"{self.prefix}queues"

    def seq(self) -> str:  # string counter: submission order
        return f"{self.prefix}seq"

    def lease_seq(self) -> str:  # string counter: placement tokens
        return f"{self.prefix}lease"

    def idempotency(self, key_digest: str) -> str:  # string: job id (key is a SHA-256 digest)
        return f"{self.prefix}idem:{key_digest}"

    def acks(self) -> str:  # zset: dispatched job id -> acknowledgement deadline (ms)
        return f"{self.prefix}acks"

    def cancels(self) -> str:  # zset: running job id -> when its worker was last told to cancel it (ms)
        return f"{self.prefix}cancels"

    # --- workers --------------------------------------------------------------------------
    def workers(self) -> str:  # zset: worker id -> heartbeat expiry (ms)
        return f"{self.prefix}workers"

    def worker(self, worker_id: str) -> str:  # hash
        return f"{self.prefix}worker:{worker_id}"

    def worker_jobs(self, worker_id: str) -> str:  # set: job ids placed on the worker
        return f"{self.prefix}worker:{worker_id}:jobs"

    def queue_workers(self, queue: str) -> str:  # set: worker ids serving the queue
        return f"{self.prefix}qworkers:{queue}"

    # --- pub/sub channels -----------------------------------------------------------------
    def dispatch_channel(self, worker_id: str) -> str:  # pub/sub: WorkerMessage
        return f"{self.prefix}dispatch:{worker_id}"

    def results_channel(self) -> str:  # pub/sub: JobEvent
        return f"{self.prefix}results"

    def workers_channel(self) -> str:  # pub/sub: WorkerStatus
        return f"{self.prefix}worker-status"
