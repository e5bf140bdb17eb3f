from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthCheck(_message.Message):
    __slots__ = ("kind", "port", "path", "host", "expect_status", "body", "grpc_service", "interval_ms", "timeout_ms", "rise", "fall", "via")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    EXPECT_STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    FALL_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    kind: str
    port: int
    path: str
    host: str
    expect_status: _containers.RepeatedScalarFieldContainer[int]
    body: str
    grpc_service: str
    interval_ms: int
    timeout_ms: int
    rise: int
    fall: int
    via: str
    def __init__(self, kind: _Optional[str] = ..., port: _Optional[int] = ..., path: _Optional[str] = ..., host: _Optional[str] = ..., expect_status: _Optional[_Iterable[int]] = ..., body: _Optional[str] = ..., grpc_service: _Optional[str] = ..., interval_ms: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., rise: _Optional[int] = ..., fall: _Optional[int] = ..., via: _Optional[str] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("source", "metric", "labels", "port", "path", "target", "interval_ms", "timeout_ms", "smoothing", "min_factor", "max_factor", "hysteresis", "churn_budget", "churn_window_s", "stale_after_ms")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    MIN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_FACTOR_FIELD_NUMBER: _ClassVar[int]
    HYSTERESIS_FIELD_NUMBER: _ClassVar[int]
    CHURN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CHURN_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    source: str
    metric: str
    labels: str
    port: int
    path: str
    target: float
    interval_ms: int
    timeout_ms: int
    smoothing: float
    min_factor: float
    max_factor: float
    hysteresis: float
    churn_budget: float
    churn_window_s: float
    stale_after_ms: int
    def __init__(self, source: _Optional[str] = ..., metric: _Optional[str] = ..., labels: _Optional[str] = ..., port: _Optional[int] = ..., path: _Optional[str] = ..., target: _Optional[float] = ..., interval_ms: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., smoothing: _Optional[float] = ..., min_factor: _Optional[float] = ..., max_factor: _Optional[float] = ..., hysteresis: _Optional[float] = ..., churn_budget: _Optional[float] = ..., churn_window_s: _Optional[float] = ..., stale_after_ms: _Optional[int] = ...) -> None: ...

class QuicConfig(_message.Message):
    __slots__ = ("server_id_len", "rotation")
    SERVER_ID_LEN_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    server_id_len: int
    rotation: int
    def __init__(self, server_id_len: _Optional[int] = ..., rotation: _Optional[int] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("address", "weight", "drained", "check", "server_id", "status")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: int
    drained: bool
    check: HealthCheck
    server_id: int
    status: BackendStatus
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., drained: _Optional[bool] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., server_id: _Optional[int] = ..., status: _Optional[_Union[BackendStatus, _Mapping]] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("healthy", "available", "index", "ring_positions", "effective_weight", "packets", "bytes", "health", "last_result", "check_latency_ms", "since", "check", "load", "load_age_s", "load_state", "capacity_factor", "slow_start_factor", "health_realised", "realised_since", "active_flows")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RING_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    CHECK_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SLOW_START_FACTOR_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REALISED_FIELD_NUMBER: _ClassVar[int]
    REALISED_SINCE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FLOWS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    available: bool
    index: int
    ring_positions: int
    effective_weight: int
    packets: int
    bytes: int
    health: str
    last_result: str
    check_latency_ms: float
    since: float
    check: str
    load: float
    load_age_s: float
    load_state: str
    capacity_factor: float
    slow_start_factor: float
    health_realised: bool
    realised_since: float
    active_flows: int
    def __init__(self, healthy: _Optional[bool] = ..., available: _Optional[bool] = ..., index: _Optional[int] = ..., ring_positions: _Optional[int] = ..., effective_weight: _Optional[int] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., health: _Optional[str] = ..., last_result: _Optional[str] = ..., check_latency_ms: _Optional[float] = ..., since: _Optional[float] = ..., check: _Optional[str] = ..., load: _Optional[float] = ..., load_age_s: _Optional[float] = ..., load_state: _Optional[str] = ..., capacity_factor: _Optional[float] = ..., slow_start_factor: _Optional[float] = ..., health_realised: _Optional[bool] = ..., realised_since: _Optional[float] = ..., active_flows: _Optional[int] = ...) -> None: ...

class Vip(_message.Message):
    __slots__ = ("vip", "hash", "encap", "ring_size", "check", "panic_threshold", "when_none_healthy", "backends", "capacity", "slow_start_s", "quic", "health_scope", "health_quorum", "status")
    VIP_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    ENCAP_FIELD_NUMBER: _ClassVar[int]
    RING_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    PANIC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WHEN_NONE_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOW_START_S_FIELD_NUMBER: _ClassVar[int]
    QUIC_FIELD_NUMBER: _ClassVar[int]
    HEALTH_SCOPE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_QUORUM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    vip: str
    hash: str
    encap: str
    ring_size: int
    check: HealthCheck
    panic_threshold: float
    when_none_healthy: str
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    capacity: Capacity
    slow_start_s: float
    quic: QuicConfig
    health_scope: str
    health_quorum: int
    status: VipStatus
    def __init__(self, vip: _Optional[str] = ..., hash: _Optional[str] = ..., encap: _Optional[str] = ..., ring_size: _Optional[int] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., panic_threshold: _Optional[float] = ..., when_none_healthy: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., slow_start_s: _Optional[float] = ..., quic: _Optional[_Union[QuicConfig, _Mapping]] = ..., health_scope: _Optional[str] = ..., health_quorum: _Optional[int] = ..., status: _Optional[_Union[VipStatus, _Mapping]] = ...) -> None: ...

class VipStatus(_message.Message):
    __slots__ = ("mode", "vip_id", "healthy_backends", "serving_backends", "packets", "bytes", "ring_fingerprint", "announced", "unsettled_positions")
    MODE_FIELD_NUMBER: _ClassVar[int]
    VIP_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    SERVING_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RING_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    UNSETTLED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    vip_id: int
    healthy_backends: int
    serving_backends: int
    packets: int
    bytes: int
    ring_fingerprint: str
    announced: bool
    unsettled_positions: int
    def __init__(self, mode: _Optional[str] = ..., vip_id: _Optional[int] = ..., healthy_backends: _Optional[int] = ..., serving_backends: _Optional[int] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., ring_fingerprint: _Optional[str] = ..., announced: _Optional[bool] = ..., unsettled_positions: _Optional[int] = ...) -> None: ...

class VipRef(_message.Message):
    __slots__ = ("vip",)
    VIP_FIELD_NUMBER: _ClassVar[int]
    vip: str
    def __init__(self, vip: _Optional[str] = ...) -> None: ...

class BackendRef(_message.Message):
    __slots__ = ("vip", "address")
    VIP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    vip: str
    address: str
    def __init__(self, vip: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ListVipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVipsResponse(_message.Message):
    __slots__ = ("vips",)
    VIPS_FIELD_NUMBER: _ClassVar[int]
    vips: _containers.RepeatedCompositeFieldContainer[Vip]
    def __init__(self, vips: _Optional[_Iterable[_Union[Vip, _Mapping]]] = ...) -> None: ...

class AddVipRequest(_message.Message):
    __slots__ = ("vip",)
    VIP_FIELD_NUMBER: _ClassVar[int]
    vip: Vip
    def __init__(self, vip: _Optional[_Union[Vip, _Mapping]] = ...) -> None: ...

class SetVipRequest(_message.Message):
    __slots__ = ("vip", "hash", "encap", "ring_size", "check", "panic_threshold", "when_none_healthy", "capacity", "slow_start_s", "quic", "clear_quic", "health_scope", "health_quorum")
    VIP_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    ENCAP_FIELD_NUMBER: _ClassVar[int]
    RING_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    PANIC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WHEN_NONE_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOW_START_S_FIELD_NUMBER: _ClassVar[int]
    QUIC_FIELD_NUMBER: _ClassVar[int]
    CLEAR_QUIC_FIELD_NUMBER: _ClassVar[int]
    HEALTH_SCOPE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_QUORUM_FIELD_NUMBER: _ClassVar[int]
    vip: str
    hash: str
    encap: str
    ring_size: int
    check: HealthCheck
    panic_threshold: float
    when_none_healthy: str
    capacity: Capacity
    slow_start_s: float
    quic: QuicConfig
    clear_quic: bool
    health_scope: str
    health_quorum: int
    def __init__(self, vip: _Optional[str] = ..., hash: _Optional[str] = ..., encap: _Optional[str] = ..., ring_size: _Optional[int] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., panic_threshold: _Optional[float] = ..., when_none_healthy: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., slow_start_s: _Optional[float] = ..., quic: _Optional[_Union[QuicConfig, _Mapping]] = ..., clear_quic: _Optional[bool] = ..., health_scope: _Optional[str] = ..., health_quorum: _Optional[int] = ...) -> None: ...

class AddBackendRequest(_message.Message):
    __slots__ = ("vip", "backend")
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    vip: str
    backend: Backend
    def __init__(self, vip: _Optional[str] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ...) -> None: ...

class SetBackendRequest(_message.Message):
    __slots__ = ("vip", "address", "weight", "drained", "check", "clear_check", "server_id", "force_server_id")
    VIP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    CLEAR_CHECK_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    vip: str
    address: str
    weight: int
    drained: bool
    check: HealthCheck
    clear_check: bool
    server_id: int
    force_server_id: bool
    def __init__(self, vip: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[int] = ..., drained: _Optional[bool] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., clear_check: _Optional[bool] = ..., server_id: _Optional[int] = ..., force_server_id: _Optional[bool] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("document", "dry_run")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    document: str
    dry_run: bool
    def __init__(self, document: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ChangeResponse(_message.Message):
    __slots__ = ("changes", "reconcile")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    RECONCILE_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedScalarFieldContainer[str]
    reconcile: ReconcileSummary
    def __init__(self, changes: _Optional[_Iterable[str]] = ..., reconcile: _Optional[_Union[ReconcileSummary, _Mapping]] = ...) -> None: ...

class ReconcileSummary(_message.Message):
    __slots__ = ("map_writes", "ring_positions", "duration_ms")
    class RingPositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MAP_WRITES_FIELD_NUMBER: _ClassVar[int]
    RING_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    map_writes: int
    ring_positions: _containers.ScalarMap[str, int]
    duration_ms: float
    def __init__(self, map_writes: _Optional[int] = ..., ring_positions: _Optional[_Mapping[str, int]] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StateDocument(_message.Message):
    __slots__ = ("document",)
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    document: str
    def __init__(self, document: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("vip",)
    VIP_FIELD_NUMBER: _ClassVar[int]
    vip: str
    def __init__(self, vip: _Optional[str] = ...) -> None: ...

class Counter(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class TrafficStats(_message.Message):
    __slots__ = ("vip", "backend", "packets", "bytes")
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    vip: str
    backend: str
    packets: int
    bytes: int
    def __init__(self, vip: _Optional[str] = ..., backend: _Optional[str] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("traffic", "counters")
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficStats]
    counters: _containers.RepeatedCompositeFieldContainer[Counter]
    def __init__(self, traffic: _Optional[_Iterable[_Union[TrafficStats, _Mapping]]] = ..., counters: _Optional[_Iterable[_Union[Counter, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Interface(_message.Message):
    __slots__ = ("name", "prog_id", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROG_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    prog_id: int
    mode: str
    def __init__(self, name: _Optional[str] = ..., prog_id: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "interfaces", "nexthop_mac", "nexthop_source", "state_file", "pin_dir", "vips", "backends", "max_vips", "max_backends", "ring_entries_used", "ring_entries", "last_reconcile", "vip_status", "bgp", "host_drained", "flow_table")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    NEXTHOP_MAC_FIELD_NUMBER: _ClassVar[int]
    NEXTHOP_SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FILE_FIELD_NUMBER: _ClassVar[int]
    PIN_DIR_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    RING_ENTRIES_USED_FIELD_NUMBER: _ClassVar[int]
    RING_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_RECONCILE_FIELD_NUMBER: _ClassVar[int]
    VIP_STATUS_FIELD_NUMBER: _ClassVar[int]
    BGP_FIELD_NUMBER: _ClassVar[int]
    HOST_DRAINED_FIELD_NUMBER: _ClassVar[int]
    FLOW_TABLE_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    nexthop_mac: str
    nexthop_source: str
    state_file: str
    pin_dir: str
    vips: int
    backends: int
    max_vips: int
    max_backends: int
    ring_entries_used: int
    ring_entries: int
    last_reconcile: ReconcileSummary
    vip_status: _containers.RepeatedCompositeFieldContainer[Vip]
    bgp: BgpStatus
    host_drained: bool
    flow_table: FlowTableStatus
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., nexthop_mac: _Optional[str] = ..., nexthop_source: _Optional[str] = ..., state_file: _Optional[str] = ..., pin_dir: _Optional[str] = ..., vips: _Optional[int] = ..., backends: _Optional[int] = ..., max_vips: _Optional[int] = ..., max_backends: _Optional[int] = ..., ring_entries_used: _Optional[int] = ..., ring_entries: _Optional[int] = ..., last_reconcile: _Optional[_Union[ReconcileSummary, _Mapping]] = ..., vip_status: _Optional[_Iterable[_Union[Vip, _Mapping]]] = ..., bgp: _Optional[_Union[BgpStatus, _Mapping]] = ..., host_drained: _Optional[bool] = ..., flow_table: _Optional[_Union[FlowTableStatus, _Mapping]] = ...) -> None: ...

class FlowTableStatus(_message.Message):
    __slots__ = ("capacity", "entries", "active", "active_window_s", "swept_at", "evicted")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    SWEPT_AT_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    entries: int
    active: int
    active_window_s: int
    swept_at: float
    evicted: int
    def __init__(self, capacity: _Optional[int] = ..., entries: _Optional[int] = ..., active: _Optional[int] = ..., active_window_s: _Optional[int] = ..., swept_at: _Optional[float] = ..., evicted: _Optional[int] = ...) -> None: ...

class BgpStatus(_message.Message):
    __slots__ = ("enabled", "sessions", "announced", "error")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    sessions: _containers.RepeatedCompositeFieldContainer[BgpSession]
    announced: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, enabled: _Optional[bool] = ..., sessions: _Optional[_Iterable[_Union[BgpSession, _Mapping]]] = ..., announced: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class BgpSession(_message.Message):
    __slots__ = ("name", "state", "info")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    info: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., info: _Optional[str] = ...) -> None: ...

class DrainHostRequest(_message.Message):
    __slots__ = ("undo", "wait_s", "quiet_s")
    UNDO_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    QUIET_S_FIELD_NUMBER: _ClassVar[int]
    undo: bool
    wait_s: float
    quiet_s: float
    def __init__(self, undo: _Optional[bool] = ..., wait_s: _Optional[float] = ..., quiet_s: _Optional[float] = ...) -> None: ...

class DrainHostResponse(_message.Message):
    __slots__ = ("drained", "waited_s", "new_flows", "message")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    NEW_FLOWS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    waited_s: float
    new_flows: int
    message: str
    def __init__(self, drained: _Optional[bool] = ..., waited_s: _Optional[float] = ..., new_flows: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "message", "vip", "backend")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    message: str
    vip: str
    backend: str
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., vip: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("address", "value", "vip")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    address: str
    value: float
    vip: str
    def __init__(self, address: _Optional[str] = ..., value: _Optional[float] = ..., vip: _Optional[str] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class CountFlowsRequest(_message.Message):
    __slots__ = ("vip", "address", "active_within_s")
    VIP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    vip: str
    address: str
    active_within_s: float
    def __init__(self, vip: _Optional[str] = ..., address: _Optional[str] = ..., active_within_s: _Optional[float] = ...) -> None: ...

class FlowCount(_message.Message):
    __slots__ = ("flows", "active")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    flows: int
    active: int
    def __init__(self, flows: _Optional[int] = ..., active: _Optional[int] = ...) -> None: ...

class ListFlowsRequest(_message.Message):
    __slots__ = ("vip", "backend", "limit", "from_set")
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FROM_SET_FIELD_NUMBER: _ClassVar[int]
    vip: str
    backend: str
    limit: int
    from_set: int
    def __init__(self, vip: _Optional[str] = ..., backend: _Optional[str] = ..., limit: _Optional[int] = ..., from_set: _Optional[int] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("client", "client_port", "vip", "port", "backend", "idle_s")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    client: str
    client_port: int
    vip: str
    port: int
    backend: str
    idle_s: int
    def __init__(self, client: _Optional[str] = ..., client_port: _Optional[int] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., backend: _Optional[str] = ..., idle_s: _Optional[int] = ...) -> None: ...

class ListFlowsResponse(_message.Message):
    __slots__ = ("flows", "from_set", "next_set", "total_sets", "ways", "entries_read", "limit_reached")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    FROM_SET_FIELD_NUMBER: _ClassVar[int]
    NEXT_SET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SETS_FIELD_NUMBER: _ClassVar[int]
    WAYS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_READ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_REACHED_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[Flow]
    from_set: int
    next_set: int
    total_sets: int
    ways: int
    entries_read: int
    limit_reached: bool
    def __init__(self, flows: _Optional[_Iterable[_Union[Flow, _Mapping]]] = ..., from_set: _Optional[int] = ..., next_set: _Optional[int] = ..., total_sets: _Optional[int] = ..., ways: _Optional[int] = ..., entries_read: _Optional[int] = ..., limit_reached: _Optional[bool] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FleetHost(_message.Message):
    __slots__ = ("name", "live", "revision", "behind_s", "version", "addresses", "drained", "bgp", "fingerprints", "down", "drift", "reported_at")
    class FingerprintsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BEHIND_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    BGP_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    live: bool
    revision: int
    behind_s: float
    version: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    drained: bool
    bgp: str
    fingerprints: _containers.ScalarMap[str, str]
    down: _containers.RepeatedScalarFieldContainer[str]
    drift: _containers.RepeatedScalarFieldContainer[str]
    reported_at: float
    def __init__(self, name: _Optional[str] = ..., live: _Optional[bool] = ..., revision: _Optional[int] = ..., behind_s: _Optional[float] = ..., version: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., drained: _Optional[bool] = ..., bgp: _Optional[str] = ..., fingerprints: _Optional[_Mapping[str, str]] = ..., down: _Optional[_Iterable[str]] = ..., drift: _Optional[_Iterable[str]] = ..., reported_at: _Optional[float] = ...) -> None: ...

class FleetStatusResponse(_message.Message):
    __slots__ = ("enabled", "connected", "prefix", "endpoints", "newest_revision", "realised_revision", "hosts", "error", "host")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEWEST_REVISION_FIELD_NUMBER: _ClassVar[int]
    REALISED_REVISION_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    connected: bool
    prefix: str
    endpoints: str
    newest_revision: int
    realised_revision: int
    hosts: _containers.RepeatedCompositeFieldContainer[FleetHost]
    error: str
    host: str
    def __init__(self, enabled: _Optional[bool] = ..., connected: _Optional[bool] = ..., prefix: _Optional[str] = ..., endpoints: _Optional[str] = ..., newest_revision: _Optional[int] = ..., realised_revision: _Optional[int] = ..., hosts: _Optional[_Iterable[_Union[FleetHost, _Mapping]]] = ..., error: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class FleetImportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FleetImportResponse(_message.Message):
    __slots__ = ("revision", "vips")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    vips: int
    def __init__(self, revision: _Optional[int] = ..., vips: _Optional[int] = ...) -> None: ...

class FleetForgetRequest(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...

class FleetForgetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
