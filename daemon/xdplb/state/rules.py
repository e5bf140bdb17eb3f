"""What every input is checked against: the formats, the limits, the refusals."""

from __future__ import annotations

import re
import reprlib
from collections.abc import Sequence

FORMAT_VERSION = 1
PROTOCOLS = ("tcp", "udp")
HASH_MODES = ("5tuple", "source")
ENCAPSULATIONS = ("ipip", "gue")
CHECK_KINDS = ("none", "tcp", "tcp-syn", "http", "https", "grpc", "h3")
CHECK_VIAS = ("backend", "vip")  # probe the backend's own address, or the VIP through the tunnel
WHEN_NONE_HEALTHY = ("drop", "all")
HEALTH_SCOPES = ("host", "fleet")  # whose checks decide: this host's, or the fleet's quorum
MAX_HEALTH_QUORUM = 64
LOAD_SOURCES = ("none", "prometheus", "push")
MAX_WEIGHT = 10_000
DEFAULT_WEIGHT = 100

# Every string has a character set and a length, every list a count, every number
# a range (docs/limits): nothing an operator sends can reach a socket, a log line or
# a file with CR, LF or NUL in it, nor grow the state past what the API can answer.
MAX_ADDRESS_TEXT = 64  # "[ffff:...:255.255.255.255]:65535/udp" is 56
MAX_PATH = 1024
MAX_HOST = 255
MAX_BODY = 256
MAX_GRPC_SERVICE = 256
MAX_METRIC = 200
MAX_LABELS = 1024
MAX_STATUS_CODES = 16
# The largest gRPC message lbd and lbctl send or take (the library's default is 4 MiB).
MAX_MESSAGE_BYTES = 256 << 20
# The state as compact JSON: its export and listings stay far inside the API's
# message limit, whatever the map sizes allow (tests/test_limits.py measures it).
MAX_STATE_BYTES = 8 << 20
# An apply document as sent (any formatting): more than the largest state exported.
MAX_DOCUMENT_BYTES = 32 << 20
_HTTP_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
_HTTP_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_GRPC_SERVICE = re.compile(r"[A-Za-z0-9_./-]*")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class StateError(ValueError):
    """A change was refused; the message says what and why."""


class NotFound(StateError):
    """The change names a VIP or backend that does not exist."""


class AlreadyExists(StateError):
    """The change adds a VIP or backend that exists already."""


class LimitExceeded(StateError):
    """The result would not fit the maps."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxlong = 2, 6, 6, 40


def shown(value: object) -> str:
    """repr() for a message, bounded: a value from a request may be megabytes long or
    deeply nested, and what it says goes into logs and answers."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return f"<{type(value).__name__} too large to show>"


def _fail(where: str, message: str) -> StateError:
    return StateError(f"{where}: {message}" if where else message)


def _text(where: str, value: object, limit: int, pattern: re.Pattern[str] | None = None,
          what: str = "") -> str:
    """A string of at most `limit` characters, without control characters, matching
    `pattern` whole when one is given ("" always passes: empty means unset)."""
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {shown(value)}")
    if len(value) > limit:
        raise _fail(where, f"{len(value)} characters, more than the limit of {limit}")
    if _CONTROL.search(value):
        raise _fail(where, f"{shown(value)} holds a control character (CR, LF, NUL, ...)")
    if value and pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, f"{shown(value)} is not {what}")
    return value


def _one_of(where: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _fail(where, f"{shown(value)} is not one of {', '.join(choices)}")


def _int_in(where: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(where, f"must be an integer {low}..{high}, got {shown(value)}")
    return value
