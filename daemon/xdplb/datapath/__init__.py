"""The datapath: the only package that knows bcc.

It compiles and loads the XDP programs in bpf/ (and the balancer's tc egress
program of health checks through the tunnel), attaches and detaches them,
pins their maps under a per-instance bpffs directory so a restarted daemon
reuses them, reads and writes the maps with the layouts of structs.py, sums
per-CPU counters, and runs programs on test frames with BPF_PROG_TEST_RUN.

One concern a module: loader (bcc), bpfmap (map access), maps (the one list
of the balancer's maps), sizes (map sizes, check marks), vip_index, flow_table,
testrun, netlink (attaching), progs (programs by id), balancer, decap (the
backend-side program).
"""

from xdplb.datapath.balancer import Balancer, PinnedMaps, remove_pins
from xdplb.datapath.bpfmap import BpfMap, PerCpuArray, pinned_map_shape
from xdplb.datapath.decap import (
    DECAP_PIN_ROOT,
    DECAP_PROGRAM,
    Decapsulator,
    PinnedDecap,
    remove_decap_pins,
)
from xdplb.datapath.errors import DatapathError
from xdplb.datapath.flow_table import FlowTable, TableSweep
from xdplb.datapath.loader import BPFFS, PIN_ROOT
from xdplb.datapath.netlink import (
    attach_tc_egress,
    attach_xdp,
    attached_prog_id,
    detach_tc_egress,
    detach_xdp,
    tc_egress_programs,
)
from xdplb.datapath.progs import program_by_id, program_name
from xdplb.datapath.sizes import (
    HC_MARK_BASE,
    HC_MARK_MASK,
    MAX_BACKEND_ENTRIES,
    HealthMarks,
    MapSizes,
)
from xdplb.datapath.testrun import (
    VERDICTS,
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    SkBuffCtx,
    TestRunResult,
    XdpMd,
    prog_test_run,
)
from xdplb.datapath.vip_index import VipTable

__all__ = [
    "BPFFS",
    "DECAP_PIN_ROOT",
    "DECAP_PROGRAM",
    "HC_MARK_BASE",
    "HC_MARK_MASK",
    "MAX_BACKEND_ENTRIES",
    "PIN_ROOT",
    "VERDICTS",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_TX",
    "Balancer",
    "BpfMap",
    "DatapathError",
    "Decapsulator",
    "FlowTable",
    "HealthMarks",
    "MapSizes",
    "PerCpuArray",
    "PinnedDecap",
    "PinnedMaps",
    "SkBuffCtx",
    "TableSweep",
    "TestRunResult",
    "VipTable",
    "XdpMd",
    "attach_tc_egress",
    "attach_xdp",
    "attached_prog_id",
    "detach_tc_egress",
    "detach_xdp",
    "pinned_map_shape",
    "prog_test_run",
    "program_by_id",
    "program_name",
    "remove_decap_pins",
    "remove_pins",
    "tc_egress_programs",
]
