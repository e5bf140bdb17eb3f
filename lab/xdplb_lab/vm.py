"""The lab on virtual machines: configures one VM of vagrant/'s topology.

The same address plan, sysctls and programs as the namespace lab
(xdplb_lab.lab), applied to a VM's own interfaces: Vagrant gives each lab link
its IPv4 address; this adds the IPv6 one, the routes, the sysctls and the
role's services.

    python -m xdplb_lab.vm router  --backends 3
    python -m xdplb_lab.vm backend --index 0
    python -m xdplb_lab.vm lb      --backends 3
    python -m xdplb_lab.vm client

Every VM keeps Vagrant's management interface and its default route; lab
traffic is routed explicitly, so nothing leaves the lab links.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute

from xdplb_lab import lab

CONFIG_DIR = Path("/etc/xdplb")
SYSTEMD_DIR = Path("/etc/systemd/system")
LAB_NET4 = "10.100.0.0/16"
LAB_NET6 = "fd00:100::/32"


def log(text: str) -> None:
    print(f"vmlab: {text}", flush=True)


def ifname_with(ipr: IPRoute, address: str) -> str:
    """The interface Vagrant gave `address` to."""
    for entry in ipr.get_addr(family=socket.AF_INET):
        if entry.get_attr("IFA_ADDRESS") == address:
            return ipr.get_links(entry["index"])[0].get_attr("IFLA_IFNAME")
    raise SystemExit(f"vmlab: no interface has {address}: is the Vagrant network up?")


def add_address(ipr: IPRoute, ifname: str, cidr: str) -> None:
    index = ipr.link_lookup(ifname=ifname)[0]
    address, prefix = cidr.split("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    existing = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=family)}
    if address not in existing:
        ipr.addr("add", index=index, address=address, prefixlen=int(prefix))


def replace_route(ipr: IPRoute, dst: str, gateway: str) -> None:
    family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
    ipr.route("replace", dst=dst, gateway=gateway, family=family)


def set_sysctls(values: dict[str, int]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key.replace(".", "/")).write_text(f"{value}\n")


def run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def setup_router(backends: int) -> None:
    with IPRoute() as ipr:
        ends = [(lab.ROUTER_CLIENT_V4, lab.ROUTER_CLIENT_V6), (lab.ROUTER_LB_V4, lab.ROUTER_LB_V6)]
        ends += [(lab.router_backend_v4(i), lab.router_backend_v6(i)) for i in range(backends)]
        names = []
        for v4, v6 in ends:
            name = ifname_with(ipr, v4)
            add_address(ipr, name, f"{v6}/64")
            names.append(name)
        set_sysctls(lab.router_sysctls(names))
        replace_route(ipr, f"{lab.VIP_V4}/32", lab.LB_V4)
        replace_route(ipr, f"{lab.VIP_V6}/128", lab.LB_V6)
    log(f"router forwarding between {', '.join(names)}")


def setup_client() -> None:
    with IPRoute() as ipr:
        add_address(ipr, ifname_with(ipr, lab.CLIENT_V4), f"{lab.CLIENT_V6}/64")
        replace_route(ipr, f"{lab.VIP_V4}/32", lab.ROUTER_CLIENT_V4)
        replace_route(ipr, f"{lab.VIP_V6}/128", lab.ROUTER_CLIENT_V6)
    log(f"client: VIPs {lab.VIP_V4} and {lab.VIP_V6} routed via the router")


def setup_backend(index: int) -> None:
    v4, v6 = lab.backend_v4(index), lab.backend_v6(index)
    with IPRoute() as ipr:
        name = ifname_with(ipr, v4)
        add_address(ipr, name, f"{v6}/64")
        lo = ipr.link_lookup(ifname="lo")[0]
        for cidr in (f"{lab.VIP_V4}/32", f"{lab.VIP_V6}/128"):
            address, prefix = cidr.split("/")
            if address not in {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo)}:
                ipr.addr("add", index=lo, address=address, prefixlen=int(prefix))
        replace_route(ipr, LAB_NET4, lab.router_backend_v4(index))
        replace_route(ipr, LAB_NET6, lab.router_backend_v6(index))
    set_sysctls(lab.backend_sysctls(name))
    attach_decapsulator(name, [v4, v6])
    write_unit("xdplb-backend", f"HTTP server of lab backend{index}",
               f"{sys.executable} -m xdplb_lab.backend_server --name backend{index} --port 80")
    run("systemctl", "daemon-reload")
    run("systemctl", "enable", "--now", "xdplb-backend")
    log(f"backend{index}: decapsulator on {name}, VIPs on lo, HTTP on port 80")


def attach_decapsulator(ifname: str, addresses: list[str]) -> None:
    """The program stays attached (and its maps alive) after this process exits."""
    from xdplb.datapath import Decapsulator

    decap = Decapsulator()
    for address in addresses:
        decap.accept(address)
    decap.attach(ifname)


def write_unit(name: str, description: str, command: str) -> None:
    (SYSTEMD_DIR / f"{name}.service").write_text(
        f"[Unit]\nDescription={description}\nAfter=network-online.target\n\n"
        f"[Service]\nExecStart={command}\nRestart=always\n\n"
        "[Install]\nWantedBy=multi-user.target\n")


def lab_state(backends: int) -> dict:
    """The VIPs the lab serves, as an `lbctl apply` document."""
    return {"version": 1, "vips": [
        {"vip": f"{lab.VIP_V4}:80/tcp",
         "backends": [{"address": lab.backend_v4(i)} for i in range(backends)]},
        {"vip": f"[{lab.VIP_V6}]:80/tcp",
         "backends": [{"address": lab.backend_v6(i)} for i in range(backends)]},
    ]}


def setup_lb(backends: int) -> None:
    with IPRoute() as ipr:
        name = ifname_with(ipr, lab.LB_V4)
        add_address(ipr, name, f"{lab.LB_V6}/64")
        replace_route(ipr, LAB_NET4, lab.ROUTER_LB_V4)
        replace_route(ipr, LAB_NET6, lab.ROUTER_LB_V6)
    CONFIG_DIR.mkdir(exist_ok=True)
    # The VM's default route is Vagrant's: name the lab router as the next hop.
    (CONFIG_DIR / "lbd.toml").write_text(
        f'interfaces = ["{name}"]\nxdp_mode = "native"\n\n'
        f'[nexthop]\nvia = "{lab.ROUTER_LB_V4}"\n')
    unit = Path(__file__).with_name("lbd.service").read_text()
    (SYSTEMD_DIR / "lbd.service").write_text(
        unit.replace("/opt/xdplb/.venv/bin/lbd", str(Path(sys.executable).with_name("lbd"))))
    run("systemctl", "daemon-reload")
    run("systemctl", "enable", "--now", "lbd")
    lbctl = str(Path(sys.executable).with_name("lbctl"))
    for _ in range(120):
        if subprocess.run([lbctl, "status"], capture_output=True).returncode == 0:
            break
        time.sleep(1)
    document = json.dumps(lab_state(backends))
    subprocess.run([lbctl, "apply", "-f", "-"], input=document, text=True, check=True)
    log(f"lb: lbd on {name}, VIPs {lab.VIP_V4}:80 and [{lab.VIP_V6}]:80 "
        f"over {backends} backends")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["router", "client", "lb", "backend"])
    parser.add_argument("--index", type=int, default=0, help="backend number")
    parser.add_argument("--backends", type=int, default=3, help="how many backends")
    args = parser.parse_args()
    if not 1 <= args.backends <= lab.MAX_BACKENDS:
        parser.error(f"--backends must be 1..{lab.MAX_BACKENDS}")
    if args.role == "router":
        setup_router(args.backends)
    elif args.role == "client":
        setup_client()
    elif args.role == "backend":
        setup_backend(args.index)
    else:
        setup_lb(args.backends)


if __name__ == "__main__":
    main()
