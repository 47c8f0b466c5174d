import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jobgate.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchJob(_message.Message):
    __slots__ = ("job_id", "lease", "attempt", "spec", "timeout_ms", "ack_deadline", "spec_omitted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SPEC_OMITTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease: int
    attempt: int
    spec: _job_pb2.JobSpec
    timeout_ms: int
    ack_deadline: _timestamp_pb2.Timestamp
    spec_omitted: bool
    def __init__(self, job_id: _Optional[str] = ..., lease: _Optional[int] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., ack_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spec_omitted: _Optional[bool] = ...) -> None: ...

class DispatchJobs(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[DispatchJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[DispatchJob, _Mapping]]] = ...) -> None: ...

class CancelJob(_message.Message):
    __slots__ = ("job_id", "lease")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease: int
    def __init__(self, job_id: _Optional[str] = ..., lease: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("dispatch", "cancel", "dispatches")
    DISPATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DISPATCHES_FIELD_NUMBER: _ClassVar[int]
    dispatch: DispatchJob
    cancel: CancelJob
    dispatches: DispatchJobs
    def __init__(self, dispatch: _Optional[_Union[DispatchJob, _Mapping]] = ..., cancel: _Optional[_Union[CancelJob, _Mapping]] = ..., dispatches: _Optional[_Union[DispatchJobs, _Mapping]] = ...) -> None: ...

class JobEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[_job_pb2.JobEvent, _Mapping]]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "change")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[WorkerStatus.Change]
        CHANGE_JOINED: _ClassVar[WorkerStatus.Change]
        CHANGE_LEAVING: _ClassVar[WorkerStatus.Change]
        CHANGE_LEFT: _ClassVar[WorkerStatus.Change]
    CHANGE_UNSPECIFIED: WorkerStatus.Change
    CHANGE_JOINED: WorkerStatus.Change
    CHANGE_LEAVING: WorkerStatus.Change
    CHANGE_LEFT: WorkerStatus.Change
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    change: WorkerStatus.Change
    def __init__(self, worker_id: _Optional[str] = ..., change: _Optional[_Union[WorkerStatus.Change, str]] = ...) -> None: ...
