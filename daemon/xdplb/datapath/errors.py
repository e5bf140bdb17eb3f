"""The datapath's one error type."""

from __future__ import annotations


class DatapathError(Exception):
    """A datapath operation failed; the message says which and why."""


def raise_errno(what: str) -> None:
    """Raises DatapathError with what the failed call left in errno."""
    import ctypes as ct
    import os

    err = ct.get_errno()
    raise DatapathError(f"{what}: {os.strerror(err)} (errno {err})")
