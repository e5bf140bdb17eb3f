"""Health checking: lbd's check loops decide who gets traffic.

One scheduler in lbd's event loop runs every check (checker): a heap of due
times and a single timer. TCP checks are non-blocking connects watched by
one epoll, ended with a reset, their sockets reused (tcp_prober); HTTP(S)
and gRPC checks run as tasks (probes). A check is identified by what it
probes and how, so identical checks of a backend serving several VIPs run
once and share their verdict. Each follows HAProxy's rise/fall rule, and a
backend that keeps flapping is held down by a damping penalty (verdicts: the
policy, no I/O). Verdict changes reach the controller in batches; every
change is told as a typed event. docs/health-and-capacity.md explains the
timing guarantees and the choices.
"""

from xdplb.health.checker import (
    APPLY_RETRY_S,
    JITTER,
    MAX_CONCURRENT_PROBES,
    MAX_STARTS_PER_TICK,
    TICK_S,
    Apply,
    HealthChecker,
    Notify,
    Observe,
)
from xdplb.health.probes import (
    HTTP_READ_LIMIT,
    GrpcChannels,
    Probe,
    Result,
    _judge_http,
    check_socket,
    connect_reason,
    run_probe,
)
from xdplb.health.tcp_prober import _TcpProber
from xdplb.health.verdicts import (
    DAMPING_HALF_LIFE_CHECKS,
    DAMPING_MAX,
    DAMPING_PENALTY,
    DAMPING_REUSE,
    DAMPING_SUPPRESS,
    Verdict,
)

__all__ = [
    "APPLY_RETRY_S", "DAMPING_HALF_LIFE_CHECKS", "DAMPING_MAX", "DAMPING_PENALTY",
    "DAMPING_REUSE", "DAMPING_SUPPRESS", "HTTP_READ_LIMIT", "JITTER", "MAX_CONCURRENT_PROBES",
    "MAX_STARTS_PER_TICK", "TICK_S", "Apply", "GrpcChannels", "HealthChecker", "Notify",
    "Observe", "Probe", "Result", "Verdict", "_TcpProber", "_judge_http", "check_socket",
    "connect_reason", "run_probe",
]
