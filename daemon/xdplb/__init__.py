"""xdplb: XDP L4 load balancer control plane."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xdplb")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
