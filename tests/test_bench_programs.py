"""The benchmarks' own program: the memory probe (lab/bpf/bench_memprobe.c)
forwards, counts and reads as the line-rate and memory-latency benchmarks
assume."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC
from xdplb.datapath import XDP_DROP, XDP_TX, prog_test_run
from xdplb_lab.programs import MemoryProbe


@pytest.fixture(scope="module")
def probe():
    p = MemoryProbe(1 << 20)
    yield p
    p.close()


def test_memory_probe_swaps_macs_after_its_read(probe) -> None:
    assert probe.table_bytes == 1 << 20
    probe.clear()
    frame = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.100.1.2", dst="10.200.0.10")
                  / TCP(sport=40000, dport=80, flags="A"))
    result = prog_test_run(probe.prog_fd, frame)
    assert result.verdict == XDP_TX
    # The array is all zeros, so the byte the read is folded into is unchanged.
    assert result.data == frame[6:12] + frame[0:6] + frame[12:]
    assert probe.counts() == (1, 0)


def test_memory_probe_drops_and_counts_what_is_not_ipv4_tcp(probe) -> None:
    probe.clear()
    frame = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.100.1.2", dst="10.200.0.10")
                  / UDP(sport=40000, dport=80))
    assert prog_test_run(probe.prog_fd, frame).verdict == XDP_DROP
    assert probe.counts() == (0, 1)


def test_memory_latency_is_an_average_over_its_dependent_reads(probe) -> None:
    latency = probe.read_latency_ns(runs=10)
    # duration_ns is the kernel's integer ns per run of 256 reads.
    assert latency > 0
    assert (latency * MemoryProbe.LATENCY_READS).is_integer()
