"""BPF C sources of xdplb, shipped as package data (compiled at run time by bcc)."""
