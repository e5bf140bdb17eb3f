"""What the maps hold: their sizes (compiled into the maps) and the socket
marks of health checks through the tunnel."""

from __future__ import annotations

from dataclasses import dataclass

from xdplb import structs
from xdplb.datapath.errors import DatapathError

MAX_BACKEND_ENTRIES = 1 << 16  # entry 0 reserved: 65,535 backends (per VIP, summed)


@dataclass(frozen=True)
class MapSizes:
    """Capacities compiled into the maps. Changing one needs new maps.

    conn_entries is the flow table's capacity, shared by every CPU: a power
    of two, laid out as conn_entries / 4 sets of 4 ways (structs.FLOW_WAYS),
    32 bytes a flow (32 MiB for the default). The VIP index has the smallest
    power of two of slots that is at least 4 x max_vips (and 64), so its
    probe chains stay short.
    """

    max_vips: int = 512
    max_backends: int = 4096
    ring_entries: int = 64 * 65537  # shared by every VIP's ring
    conn_entries: int = 1 << 20

    def __post_init__(self) -> None:
        for name, minimum in (
            ("max_vips", 2),  # index 0 is reserved
            ("max_backends", 2),  # likewise
            ("ring_entries", 3),
            ("conn_entries", 16),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise DatapathError(f"map size {name}={value!r}: must be an integer >= {minimum}")
        # 65,535 backends at most: the default health mark carries a 16-bit index, and
        # the API lists every backend's status within its message limit (state/rules.py).
        if self.max_backends > MAX_BACKEND_ENTRIES:
            raise DatapathError(f"map size max_backends={self.max_backends!r}: must be "
                                f"<= {MAX_BACKEND_ENTRIES}")
        if self.conn_entries & (self.conn_entries - 1):
            raise DatapathError(f"map size conn_entries={self.conn_entries!r}: must be a power "
                                f"of two (sets x {structs.FLOW_WAYS} ways)")

    @property
    def conn_set_bits(self) -> int:
        """log2 of the flow table's sets."""
        return (self.conn_entries // structs.FLOW_WAYS).bit_length() - 1

    @property
    def vip_index_bits(self) -> int:
        """log2 of the VIP index's slots."""
        return max(6, (4 * self.max_vips - 1).bit_length())


HC_MARK_BASE = 0x58440000
HC_MARK_MASK = 0xFFFF0000


@dataclass(frozen=True)
class HealthMarks:
    """The socket marks of health checks sent through the tunnel.

    A marked check packet carries `base | index`: the bits outside `mask`
    name the backend entry it is for (bpf/balancer.c xdplb_hc_encap). The mask
    must be contiguous high bits, and the index part must hold every backend
    index."""

    base: int = HC_MARK_BASE
    mask: int = HC_MARK_MASK

    def validate(self, max_backends: int) -> None:
        if not isinstance(self.mask, int) or isinstance(self.mask, bool) or not (
                0 < self.mask <= 0xFFFFFFFF):
            raise DatapathError(f"fwmark_mask {self.mask!r}: must be a 32-bit mask")
        free = ~self.mask & 0xFFFFFFFF
        if free & (free + 1):
            raise DatapathError(f"fwmark_mask {self.mask:#010x}: must be contiguous high "
                                "bits (e.g. 0xffff0000); the low bits carry the backend index")
        if not isinstance(self.base, int) or isinstance(self.base, bool) or not (
                0 < self.base <= 0xFFFFFFFF) or self.base & free:
            shown = f"{self.base:#010x}" if isinstance(self.base, int) else repr(self.base)
            raise DatapathError(f"fwmark {shown}: must be a nonzero 32-bit mark within "
                                f"fwmark_mask {self.mask:#010x}")
        if max_backends - 1 > free:
            raise DatapathError(f"fwmark_mask {self.mask:#010x}: leaves room for backend "
                                f"indexes up to {free}, but maps.max_backends is "
                                f"{max_backends} (indexes up to {max_backends - 1})")

    def mark(self, index: int) -> int:
        """The mark of backend entry `index`'s checks."""
        if not 0 < index <= ~self.mask & 0xFFFFFFFF:
            raise DatapathError(f"backend index {index} does not fit fwmark_mask {self.mask:#x}")
        return self.base | index
