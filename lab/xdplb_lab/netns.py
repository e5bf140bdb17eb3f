"""Network namespaces that clean up after themselves: a lab of hosts joined by
veth pairs, run markers that tell a crashed run's leftovers from a live one's, and
helpers for tests (offloads, GRO, waiting for a port)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

MARKER_DIR = Path("/run/xdplb-lab")
NETNS_DIR = Path("/run/netns")
IFNAMSIZ_MAX = 15  # kernel interface names are at most 15 bytes plus NUL
NUD_PERMANENT = 0x80


_NAME_RE = re.compile(r"^[a-z0-9]+$")


class LabError(RuntimeError):
    """Raised when the lab cannot be built or used as asked."""


class CommandError(subprocess.CalledProcessError):
    """A command inside a namespace failed; unlike the base class, str() includes stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


# --------------------------------------------------------------------------- run markers


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie pid, else None.

    Comparing start times guards against pid reuse: a recycled pid has a different start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie no longer owns anything
        return None
    return int(fields[19])


def _owner_alive(marker: Mapping[str, Any]) -> bool:
    """Whether the marker's creator still runs; a malformed marker counts as alive (hands off)."""
    try:
        start = _proc_start_time(int(marker["pid"]))
    except (KeyError, TypeError, ValueError):
        return True
    return start is not None and start == marker.get("start")


def _write_marker(runid: str) -> Path:
    """Create the run's marker atomically; O_EXCL also makes the run id unique."""
    data = json.dumps({"pid": os.getpid(), "start": _proc_start_time(os.getpid())})
    path = MARKER_DIR / runid
    for _ in range(3):  # another run may rmdir the (empty) directory between our two calls
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return path
    raise LabError(f"cannot create marker {path}")


def _read_marker(runid: str) -> dict[str, Any] | None:
    try:
        return json.loads((MARKER_DIR / runid).read_text())
    except (OSError, ValueError):
        return None


def _drop_marker(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):  # still in use by another run: fine
        MARKER_DIR.rmdir()


# --------------------------------------------------------------------------- namespaces


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _kill_ns_processes(names: Sequence[str]) -> None:
    """SIGKILL every process still living in the given namespaces.

    A namespace (and its veths) only disappears once no process holds it, so a daemon a test
    forgot would otherwise keep the lab alive after its mount is gone.
    """
    wanted = set(names)
    me = os.getpid()
    for ns, pids in netns.ns_pids().items():
        if ns not in wanted:
            continue
        for pid in pids:
            if pid != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _remove_netns(name: str) -> bool:
    """Delete a namespace mount; True if it is gone (including 'was already gone')."""
    try:
        netns.remove(name)
    except FileNotFoundError:
        return True
    except OSError:
        return not _netns_exists(name)
    return True


def _runid_of(ns_name: str) -> str:
    return ns_name.split("-", 1)[0]


def remove_stale(prefix: str) -> list[str]:
    """Delete namespaces left behind by crashed lab runs whose names start with `prefix`.

    A namespace is removed only if its run's marker names a creator process that is no longer
    alive (pid gone, a zombie, or reused by a process with another start time). Namespaces
    without a marker are not provably ours and are left alone, and so are those of live runs.
    Returns the names of the removed namespaces.
    """
    if not prefix:
        raise ValueError("remove_stale needs a non-empty prefix")
    stale = _stale_runs(prefix)
    victims = sorted(n for n in netns.listnetns() if "-" in n and _runid_of(n) in stale)
    _kill_ns_processes(victims)
    removed = [n for n in victims if _remove_netns(n)]
    leftover = {_runid_of(n) for n in victims if n not in removed}
    for runid in stale - leftover:
        _remove_pins(runid)
        _drop_marker(MARKER_DIR / runid)
    return removed


def pin_dir_of(runid: str) -> Path:
    """Where a lab's lbd pins its maps: removed with the lab, or by remove_stale."""
    from xdplb.datapath import PIN_ROOT

    return PIN_ROOT / runid


def _remove_pins(runid: str) -> None:
    """The pinned maps and instance locks of a run's lbd instances (named after it)."""
    for lock in Path("/run/xdplb").glob(f"{runid}*.lock"):
        lock.unlink(missing_ok=True)
    pin_dir = pin_dir_of(runid)
    shutil.rmtree(pin_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the shared root, once no instance is left
        pin_dir.parent.rmdir()


def _stale_runs(prefix: str) -> set[str]:
    """Run ids under `prefix` whose marker exists and whose creator is dead."""
    try:
        runids = [p.name for p in MARKER_DIR.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return set()
    stale = set()
    for runid in runids:
        marker = _read_marker(runid)
        if marker is not None and not _owner_alive(marker):
            stale.add(runid)
    return stale


# --------------------------------------------------------------------------- hosts


class Host:
    """One network namespace of a lab, named `{runid}-{role}`."""

    def __init__(self, lab: Lab, role: str) -> None:
        self.lab = lab
        self.role = role
        self.name = f"{lab.runid}-{role}"

    def __repr__(self) -> str:
        return f"Host({self.name!r})"

    def argv(self, argv: Sequence[str], *, share_mounts: bool = False) -> list[str]:
        """The command line that runs `argv` inside this namespace.

        `ip netns exec` gives the command a mount namespace with a fresh /sys, so a bpffs
        it mounts is its own; share_mounts enters the network namespace alone, so lbd
        pins its maps in the host's bpffs and a restarted lbd finds them.
        """
        if share_mounts:
            return ["nsenter", f"--net=/run/netns/{self.name}", "--", *map(str, argv)]
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        share_mounts: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace, capturing text output; bounded by `timeout`."""
        cmd = self.argv(argv, share_mounts=share_mounts)
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and res.returncode != 0:
            raise CommandError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a background process in the namespace; the lab kills it on close."""
        return self.lab.popen(self, argv, **kw)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set one sysctl inside this namespace (dotted key, or a /-separated path)."""
        self.sysctls({key: value})

    def sysctls(self, values: Mapping[str, str | int]) -> None:
        """Set several sysctls with a single process (each `ip netns exec` costs a fork)."""
        args: list[str] = []
        for key, value in values.items():
            path = key if "/" in key else key.replace(".", "/")
            args += [f"/proc/sys/{path.lstrip('/')}", str(value)]
        # Writing /proc/sys from inside the namespace needs only sh, not procps' sysctl.
        script = 'while [ $# -gt 0 ]; do printf "%s\\n" "$2" > "$1" || exit 1; shift 2; done'
        self.run(["sh", "-c", script, "sh", *args])

    @contextlib.contextmanager
    def ipr(self) -> Iterator[IPRoute]:
        """A pyroute2 IPRoute bound to this namespace (never re-creates a removed one)."""
        ipr = IPRoute(netns=self.name, flags=0)
        try:
            yield ipr
        finally:
            ipr.close()

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket created inside this namespace, usable from the calling process."""
        return netns.create_socket(self.name, family, type, proto, flags=0)

    def ifindex(self, ifname: str) -> int:
        with self.ipr() as ipr:
            return ifindex_of(ipr, ifname)

    def mac(self, ifname: str) -> str:
        with self.ipr() as ipr:
            return _mac(ipr, ifindex_of(ipr, ifname))

    def iface(self, ifname: str) -> Iface:
        """Describe an existing interface (addresses are those the lab assigned, none here)."""
        with self.ipr() as ipr:
            idx = ifindex_of(ipr, ifname)
            return Iface(self, ifname, idx, _mac(ipr, idx))

    def addr_add(self, ifname: str, cidr: str) -> None:
        """Assign an address; IPv6 ones get `nodad` so they are usable at once."""
        with self.ipr() as ipr:
            addr_add(ipr, ifindex_of(ipr, ifname), cidr)

    def route_add(self, dst: str, via: str, ifname: str) -> None:
        """Add a route (dst 'default' allowed) via a gateway on `ifname`."""
        with self.ipr() as ipr:
            route_add(ipr, dst, via, ifindex_of(ipr, ifname))

    def neigh_add(self, ifname: str, ip: str, mac: str) -> None:
        """Add a permanent neighbour entry (ARP or NDP) so no resolution traffic is needed."""
        with self.ipr() as ipr:
            neigh_add(ipr, ifindex_of(ipr, ifname), ip, mac)


@dataclass
class Iface:
    """One end of a link: where it lives and what it has been given."""

    host: Host
    name: str
    ifindex: int
    mac: str
    addrs: list[str] = field(default_factory=list)  # CIDR strings, in assignment order

    def _first(self, v6: bool) -> str | None:
        for cidr in self.addrs:
            ip = cidr.split("/")[0]
            if (":" in ip) == v6:
                return ip
        return None

    @property
    def ipv4(self) -> str | None:
        """The first IPv4 address assigned by the lab, without prefix length."""
        return self._first(v6=False)

    @property
    def ipv6(self) -> str | None:
        """The first IPv6 address assigned by the lab, without prefix length."""
        return self._first(v6=True)


# --------------------------------------------------------------------------- netlink helpers


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def ifindex_of(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LabError(f"no interface {ifname!r}")
    return int(idx[0])


def _mac(ipr: IPRoute, ifindex: int) -> str:
    return str(ipr.get_links(ifindex)[0].get("address"))


def addr_add(ipr: IPRoute, ifindex: int, cidr: str) -> None:
    ip, plen = cidr.split("/")
    # DAD would keep a fresh IPv6 address tentative (unusable) for about a second.
    flags = IFA_F_NODAD if family_of(ip) == socket.AF_INET6 else 0
    ipr.addr("add", index=ifindex, address=ip, prefixlen=int(plen), flags=flags)


def route_add(ipr: IPRoute, dst: str, via: str, ifindex: int) -> None:
    ipr.route("add", dst=dst, gateway=via, oif=ifindex, family=family_of(via))


def neigh_add(ipr: IPRoute, ifindex: int, ip: str, mac: str) -> None:
    ipr.neigh("add", dst=ip, lladdr=mac, ifindex=ifindex, state=NUD_PERMANENT, family=family_of(ip))


# --------------------------------------------------------------------------- the lab


class Lab:
    """Owns namespaces and processes; `close()` (or leaving the `with`) removes them all."""

    # Set in every namespace before its links exist so new interfaces inherit them:
    # no router solicitations / RA processing noise, and no DAD delaying link-local addresses.
    BASE_SYSCTLS: Mapping[str, int] = {
        "net.ipv6.conf.all.accept_ra": 0,
        "net.ipv6.conf.default.accept_ra": 0,
        "net.ipv6.conf.all.accept_dad": 0,
        "net.ipv6.conf.default.accept_dad": 0,
    }

    def __init__(self, prefix: str = "xl", kill_grace: float = 1.0) -> None:
        if not _NAME_RE.match(prefix) or len(prefix) > 6:
            raise ValueError("prefix must be 1-6 characters of [a-z0-9]")
        self.prefix = prefix
        self.kill_grace = kill_grace
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._ns_names: list[str] = []
        self._closed = False
        self._owner = os.getpid()
        self.runid, self._marker = self._claim_runid(prefix)
        atexit.register(self.close)  # a forgotten close() still cleans up at interpreter exit

    @staticmethod
    def _claim_runid(prefix: str) -> tuple[str, Path]:
        """Pick a run id nobody uses and claim it with a marker, before any namespace exists."""
        for _ in range(20):
            runid = f"{prefix}{os.getpid() % 1000}{secrets.token_hex(2)}"
            if any(_runid_of(n) == runid for n in netns.listnetns()):
                continue  # leftovers of a crashed run that used the same id
            try:
                return runid, _write_marker(runid)
            except FileExistsError:
                continue
        raise LabError("could not find a free run id")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, role: str) -> Host:
        """Create a namespace for `role` with `lo` up and the base sysctls applied."""
        if self._closed:
            raise LabError("lab is closed")
        if not _NAME_RE.match(role):
            raise ValueError(f"role must be [a-z0-9]+, got {role!r}")
        host = Host(self, role)
        if _netns_exists(host.name):
            raise LabError(f"namespace {host.name} already exists")
        self._ns_names.append(host.name)  # recorded first: close() must clean a partial create
        netns.create(host.name)
        self.hosts.append(host)
        with host.ipr() as ipr:
            ipr.link("set", index=ifindex_of(ipr, "lo"), state="up")
        host.sysctls(self.BASE_SYSCTLS)
        return host

    def connect(self, a: Host, b: Host, a_if: str, b_if: str) -> tuple[Iface, Iface]:
        """Create a veth pair `a:a_if <-> b:b_if`, both ends up, without touching the root ns."""
        for name in (a_if, b_if):
            if not name or len(name) > IFNAMSIZ_MAX:
                raise ValueError(f"bad interface name {name!r}")
        with a.ipr() as ipr:
            # The peer is created directly in b's namespace, so no temporary name is needed.
            ipr.link("add", ifname=a_if, kind="veth", peer={"ifname": b_if, "net_ns_fd": b.name})
            a_idx = ifindex_of(ipr, a_if)
            ipr.link("set", index=a_idx, state="up")
            end_a = Iface(a, a_if, a_idx, _mac(ipr, a_idx))
        with b.ipr() as ipr:
            b_idx = ifindex_of(ipr, b_if)
            ipr.link("set", index=b_idx, state="up")
            end_b = Iface(b, b_if, b_idx, _mac(ipr, b_idx))
        return end_a, end_b

    def popen(self, host: Host, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in `host`'s namespace in its own session (so its children die too)."""
        if self._closed:
            raise LabError("lab is closed")
        kw.setdefault("stdin", subprocess.DEVNULL)
        share_mounts = kw.pop("share_mounts", False)
        proc = subprocess.Popen(host.argv(argv, share_mounts=share_mounts),
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    @property
    def pin_dir(self) -> Path:
        return pin_dir_of(self.runid)

    def keep(self) -> None:
        """Leave everything running after this process exits (a demo lab to explore).

        The marker stays, so `remove_stale(prefix)` reaps the lab once its creator is gone.
        """
        self._closed = True
        atexit.unregister(self.close)

    def close(self) -> None:
        """Kill processes, delete namespaces, drop the marker. Idempotent and best-effort."""
        if self._closed or os.getpid() != self._owner:
            return  # a forked child inherits the lab (and this atexit hook) but must not close it
        self._closed = True
        atexit.unregister(self.close)
        self._stop_procs()
        _kill_ns_processes(self._ns_names)
        gone = [_remove_netns(n) for n in self._ns_names]
        _remove_pins(self.runid)
        if all(gone):  # keep the marker otherwise, so remove_stale can finish the job
            _drop_marker(self._marker)

    def _stop_procs(self) -> None:
        """SIGTERM each process group, then SIGKILL whatever outlives the grace period."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # also reaps stragglers left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # Already gone, or (PermissionError) the group id now belongs to someone else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# --------------------------------------------------------------------------- helpers for tests


def set_offloads(host: Host, ifname: str, **features: bool) -> None:
    """`ethtool -K` inside the namespace, e.g. set_offloads(h, "eth0", gro=True, tx=False)."""
    args: list[str] = []
    for feature, on in features.items():
        args += [feature.replace("_", "-"), "on" if on else "off"]
    host.run(["ethtool", "-K", ifname, *args])


def enable_gro(host: Host, ifname: str) -> None:
    """Turn GRO on for a veth end.

    Frames XDP_TX'd (or redirected) into a veth are only received by its peer if the peer has
    NAPI enabled, which for veth means GRO on (or an XDP program attached to the peer). So the
    veth end facing an interface that runs XDP_TX needs this.
    """
    set_offloads(host, ifname, gro=True)


def wait_port(host: Host, port: int, ip: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until a TCP connect to ip:port from inside `host` succeeds; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        with host.socket(family_of(ip), socket.SOCK_STREAM) as s:
            s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                s.connect((ip, port))
                return
            except OSError as e:
                last = e
        time.sleep(0.05)
    raise TimeoutError(f"{host.name}: nothing accepted on {ip}:{port} in {timeout}s ({last})")
