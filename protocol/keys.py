"""The one owner of jobgate's Redis key and channel names.

A namespace's keys live in ``shards`` groups (the ``redis_shards`` setting, 1 by default), each
under one hash tag: ``{<namespace>}`` for shard 0, ``{<namespace>:<n>}`` for shard n. A queue
belongs to shard ``crc32(queue) % shards``, with its waiting jobs, its workers' registrations and
every job submitted to it (a job id names its shard: ``int(id[:4], 16) % shards``), so each Lua
script touches one slot and, on Redis Cluster, different queues spread over the nodes. Scripts
receive the keys a call names in KEYS (the shard's own keys first, :meth:`Keys.namespace_keys`);
keys named after ids a script reads from Redis (jobs of a worker, workers of a queue) are built in
Lua from :attr:`Keys.prefix` by the key functions of ``lua/_common.lua``, which follow the same
rules as this module (a test holds the two together); ``docs/PROTOCOL.md`` writes the rules down.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KIND_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.-]{0,63}$")
SCHEDULE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # no ":": schedule:<name> and schedule:<name>:runs
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # no ":": worker:<id> and worker:<id>:jobs must not meet


MAX_SHARDS = 1024


def label_text(labels: dict[str, str] | Mapping[str, str]) -> str:
    """Labels as scripts store and compare them: sorted "name=value" pairs joined by ","."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def placement_group(kind: str, labels: Mapping[str, str]) -> str:
    """The group a job waits in (its pending zset, its entry in the kinds set): its kind, and for a
    job that requires worker labels, "|" and its labels (lua/_common.lua's group_of reads it)."""
    return f"{kind}|{label_text(labels)}" if labels else kind


def parse_group(group: str) -> tuple[str, dict[str, str]]:
    """The kind and the required labels of a placement group."""
    kind, _, text = group.partition("|")
    return kind, dict(pair.split("=", 1) for pair in text.split(",") if pair)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel builders for one namespace (default ``jobgate``) split in ``shards``, bound
    to shard ``shard``: the keys of a job or a queue name their own shard; the shard's own keys
    (counters, acks, workers, channels) are those of the bound shard (see :meth:`at`)."""

    namespace: str = "jobgate"
    shards: int = 1
    shard: int = 0

    def __post_init__(self) -> None:
        if not NAMESPACE_RE.fullmatch(self.namespace):
            raise ValueError(f"namespace must match {NAMESPACE_RE.pattern}")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"redis_shards must be between 1 and {MAX_SHARDS}, got {self.shards}")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} out of range for {self.shards} shards")

    @property
    def prefix(self) -> str:
        """Common prefix of the bound shard's keys, including its hash tag: ``{jobgate}:`` for
        shard 0, ``{jobgate:3}:`` for shard 3."""
        return self._prefix(self.shard)

    def _prefix(self, shard: int) -> str:
        return "{" + self.namespace + "}:" if shard == 0 else "{" + self.namespace + ":" + str(shard) + "}:"

    # --- shards ---------------------------------------------------------------------------
    def at(self, shard: int) -> Keys:
        """These keys bound to ``shard``."""
        return self if shard == self.shard else replace(self, shard=shard)

    def all_shards(self) -> list[Keys]:
        """The keys of every shard, shard 0 first."""
        return [self.at(s) for s in range(self.shards)]

    def queue_shard(self, queue: str) -> int:
        """The shard that holds ``queue``: its waiting jobs, its jobs and its workers' registrations."""
        return zlib.crc32(queue.encode()) % self.shards if self.shards > 1 else 0

    def job_shard(self, job_id: str) -> int:
        """The shard a job id names (its first four hex digits, modulo the shard count)."""
        return int(job_id[:4], 16) % self.shards if self.shards > 1 else 0

    def of_queue(self, queue: str) -> Keys:
        return self.at(self.queue_shard(queue))

    def of_job(self, job_id: str) -> Keys:
        return self.at(self.job_shard(job_id))

    def job_id_for(self, job_id: str, queue: str) -> str:
        """``job_id`` (32 hex digits) with its first four chosen so that it names ``queue``'s shard."""
        if self.shards == 1:
            return job_id
        shard, head = self.queue_shard(queue), int(job_id[:4], 16)
        head += shard - head % self.shards
        if head > 0xFFFF:
            head -= self.shards
        return f"{head:04x}{job_id[4:]}"

    def namespace_keys(self) -> list[str]:
        """The keys every state-changing script receives first, as KEYS[1..8], in this order."""
        return [
            self.queues(),
            self.seq(),
            self.lease_seq(),
            self.acks(),
            self.cancels(),
            self.workers(),
            self.results_channel(),
            self.delayed(),
        ]

    def own_keys(self, worker_id: str) -> list[str]:
        """The keys the scripts a worker calls receive after :meth:`namespace_keys`, as KEYS[9..10]."""
        return [self.worker(worker_id), self.worker_jobs(worker_id)]

    # --- jobs -----------------------------------------------------------------------------
    def job(self, job_id: str) -> str:  # hash (in the shard the id names)
        return f"{self._prefix(self.job_shard(job_id))}job:{job_id}"

    def job_apart(self, job_id: str, field: str) -> str:  # string: a result or output over 4 KiB, apart
        return f"{self.job(job_id)}:{field}"

    def staged(self, job_id: str, field: str, lease: int) -> str:  # string: such a value before its finish
        return f"{self.job(job_id)}:{field}:{lease}"

    def pending(self, queue: str, kind: str) -> str:  # zset: job id -> priority/sequence score
        return f"{self._prefix(self.queue_shard(queue))}pending:{queue}:{kind}"

    def queue_kinds(self, queue: str) -> str:  # set: kinds that may have jobs waiting in the queue
        return f"{self._prefix(self.queue_shard(queue))}kinds:{queue}"

    def queue_settings(self, queue: str) -> str:  # hash: 'paused' ('1' while PauseQueue holds it)
        return f"{self._prefix(self.queue_shard(queue))}queue:{queue}"

    def running(self, queue: str) -> str:  # set: ids of the queue's jobs placed (DISPATCHED or RUNNING)
        return f"{self._prefix(self.queue_shard(queue))}running:{queue}"

    def concurrency_key(self, queue: str, key: str) -> str:  # hash: a key's placed jobs ('running'), 'head'
        return f"{self._prefix(self.queue_shard(queue))}ckey:{queue}:{key}"

    def concurrency_line(self, queue: str, key: str) -> str:  # zset: a key's waiting jobs but its head
        return f"{self._prefix(self.queue_shard(queue))}ckeyjobs:{queue}:{key}"

    def jobs(self, queue: str) -> str:  # zset: the queue's job ids by seq (submission order), for ListJobs
        return f"{self._prefix(self.queue_shard(queue))}jobs:{queue}"

    def ended(self, queue: str, hour: int) -> str:  # hash: "<minute>:<state>" -> jobs that ended then
        return f"{self._prefix(self.queue_shard(queue))}ended:{queue}:{hour}"

    def known_queues(self) -> str:  # set: every queue that has had jobs, limits or a pause (in its shard)
        return f"{self.prefix}queues:all"

    def failed(self, queue: str) -> str:  # zset: FAILED job id -> when it failed (ms); the dead letters
        return f"{self._prefix(self.queue_shard(queue))}failed:{queue}"

    def queues(self) -> str:  # set: queue names that may hold waiting jobs
        return f"{self.prefix}queues"

    def seq(self) -> str:  # string counter: submission order
        return f"{self.prefix}seq"

    def lease_seq(self) -> str:  # string counter: placement tokens
        return f"{self.prefix}lease"

    def idempotency(self, key_digest: str) -> str:  # string: job id (key is a SHA-256 digest)
        return f"{self.prefix}idem:{key_digest}"

    def unique(self, key_digest: str) -> str:  # string: id of the unfinished job holding a unique key
        return f"{self.prefix}unique:{key_digest}"

    def batch(self, batch_id: str) -> str:  # hash: a batch's counts (in the shard the id names)
        return f"{self._prefix(self.job_shard(batch_id))}batch:{batch_id}"

    def batches_done(self) -> str:  # zset: ended batch id -> when, while its callback waits to be submitted
        return f"{self.prefix}batches:done"

    def acks(self) -> str:  # zset: dispatched job id -> acknowledgement deadline (ms)
        return f"{self.prefix}acks"

    def delayed(self) -> str:  # zset: SCHEDULED job id -> when it is due (ms)
        return f"{self.prefix}delayed"

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
        return f"{self._prefix(self.queue_shard(queue))}qworkers:{queue}"

    # --- periodic schedules (one set for the namespace, on shard 0) ---------------------------
    def schedules(self) -> str:  # zset: every schedule name, score 0 (listed by name)
        return f"{self._prefix(0)}schedules"

    def schedules_due(self) -> str:  # zset: schedule name -> its next tick (ms), schedules not paused
        return f"{self._prefix(0)}schedules:due"

    def schedule(self, name: str) -> str:  # hash: spec, paused, next, created, last_job
        return f"{self._prefix(0)}schedule:{name}"

    def schedule_runs(self, name: str) -> str:  # list: the last ScheduleRuns, newest first
        return f"{self._prefix(0)}schedule:{name}:runs"

    # --- pub/sub channels -----------------------------------------------------------------
    def dispatch_channel(self, worker_id: str) -> str:  # pub/sub: WorkerMessage
        return f"{self.prefix}dispatch:{worker_id}"

    def results_channel(self) -> str:  # pub/sub: JobEvent
        return f"{self.prefix}results"

    def workers_channel(self) -> str:  # pub/sub: WorkerStatus (one for the namespace, on shard 0)
        return f"{self._prefix(0)}worker-status"
