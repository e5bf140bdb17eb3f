"""A DSR backend host: `xdplb-backend setup`, `teardown` and `doctor`.

An LB host's lbd encapsulates each VIP packet to a backend's own address; the
backend strips the encapsulation (the decapsulator, an XDP program), holds the
VIP on its loopback so its stack accepts the inner packet, and answers the
client directly. This package sets that up idempotently and records what it
changed so teardown undoes exactly that (setup), says what is missing and how
to fix it (doctor), and proves the path end to end (selftest). Modules: plan
(what the operator asked for, from the command line or a TOML file), record
(what setup changed), hostnet (addresses, routes, sysctls, sockets), setup,
doctor, selftest, cli.

A separate command from lbctl: it runs on backend hosts, where there is no lbd
to talk to, and changes the host itself rather than asking a daemon.
"""
