"""Attaching and detaching: XDP on interfaces, the tc egress program of checks
through the tunnel (pyroute2)."""

from __future__ import annotations

import contextlib
import errno
from typing import Any

from xdplb.datapath.errors import DatapathError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute, NetNS

    return NetNS(netns) if netns else IPRoute()


def _ifindex(ipr: Any, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        where = f" in netns {netns}" if netns else ""
        raise DatapathError(f"no interface {ifname!r}{where}")
    return found[0]


def attach_xdp(prog_fd: int, ifname: str, *, netns: str | None = None,
               generic: bool = False) -> int:
    """Attaches (or atomically replaces) the XDP program on an interface.

    Native mode unless generic is asked for: generic XDP runs after the
    kernel has built an skb and costs several times more per packet.
    """
    flags = XDP_FLAGS_SKB_MODE if generic else XDP_FLAGS_DRV_MODE
    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        try:
            ipr.link("set", index=index,
                     xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})
        except Exception as exc:
            mode = "generic" if generic else "native"
            raise DatapathError(f"attaching XDP ({mode}) to {ifname}: {exc}") from exc
        return index


def detach_xdp(ifname: str, *, netns: str | None = None, generic: bool = False) -> None:
    flags = XDP_FLAGS_SKB_MODE if generic else XDP_FLAGS_DRV_MODE
    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        try:
            ipr.link("set", index=index,
                     xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
        except Exception as exc:
            raise DatapathError(f"detaching XDP from {ifname}: {exc}") from exc


def attached_prog_id(ifname: str, *, netns: str | None = None) -> int:
    """The id of the XDP program on an interface, 0 when none."""
    with _ipr(netns) as ipr:
        link = ipr.get_links(_ifindex(ipr, ifname, netns))[0]
        xdp = link.get_attr("IFLA_XDP")
        return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0


TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact's egress hook (TC_H_CLSACT, TC_H_MIN_EGRESS)
TC_INGRESS_PARENT = 0xFFFFFFF2
HC_FILTER_PRIO = 0x5844  # our filter's preference: left alone by, and leaving alone, others'
HC_FILTER_HANDLE = 1
HC_FILTER_NAME = "xdplb_hc_encap"


def _tc_filters(ipr: Any, index: int, parent: int) -> list[Any]:
    return [f for f in ipr.get_filters(index=index, parent=parent)
            if f.get_attr("TCA_KIND") == "bpf"]


def _is_ours(flt: Any) -> bool:
    return (flt["info"] >> 16) == HC_FILTER_PRIO


def attach_tc_egress(prog_fd: int, ifname: str, *, netns: str | None = None) -> int:
    """Attaches (or atomically replaces) a direct-action program at the clsact
    egress hook, under our own preference, creating the clsact qdisc if the
    interface has none. Other filters on the interface are left alone."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        try:
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", index, HC_FILTER_HANDLE, fd=prog_fd,
                   name=HC_FILTER_NAME, parent=TC_EGRESS_PARENT, prio=HC_FILTER_PRIO,
                   direct_action=True, protocol=0x0003)  # ETH_P_ALL
        except Exception as exc:
            raise DatapathError(f"attaching tc egress program to {ifname}: {exc}") from exc
        return index


def detach_tc_egress(ifname: str, *, netns: str | None = None) -> bool:
    """Removes our egress filter (False when there was none), and the clsact
    qdisc too once no filter is left on either of its hooks."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        try:
            ours = [f for f in _tc_filters(ipr, index, TC_EGRESS_PARENT) if _is_ours(f)]
            if ours:
                ipr.tc("del-filter", "bpf", index, HC_FILTER_HANDLE,
                       parent=TC_EGRESS_PARENT, prio=HC_FILTER_PRIO, protocol=0x0003)
            left = (ipr.get_filters(index=index, parent=TC_EGRESS_PARENT)
                    + ipr.get_filters(index=index, parent=TC_INGRESS_PARENT))
            if ours and not left:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", index)
        except NetlinkError as exc:
            raise DatapathError(f"detaching tc egress program from {ifname}: {exc}") from exc
        return bool(ours)


def tc_egress_programs(ifname: str, *, netns: str | None = None) -> list[str]:
    """Names of the bpf programs at an interface's egress hook under our preference
    (pyroute2 decodes a bpf filter's name, not its program id)."""
    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        names = []
        for flt in _tc_filters(ipr, index, TC_EGRESS_PARENT):
            options = flt.get_attr("TCA_OPTIONS")
            if _is_ours(flt) and options is not None:
                names.append(options.get_attr("TCA_BPF_NAME") or "")
        return names
