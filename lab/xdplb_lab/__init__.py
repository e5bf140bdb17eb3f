"""xdplb's lab: namespace topologies (lab), an lbd run in them (daemon), the
two-LB-host BGP lab (bgp), the Vagrant VM lab (vm), the demo, the backends'
test servers (backend_server, load_server) and the benchmarks' own BPF
programs (programs). Never shipped with xdplb."""
