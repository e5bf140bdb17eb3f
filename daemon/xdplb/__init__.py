"""xdplb: XDP L4 load balancer control plane."""
