"""ExpertFlow: run Mixture-of-Experts models whose experts do not fit on the device.

Every expert lives in one pinned host pool; equal device slots cache the ones in use;
an eviction policy (recency plus routing prediction) decides what stays, and copies run
on their own streams. This package is the Python side of the native core `expertflow._C`.
"""

from expertflow.core import (
    ExpertCache,
    ExpertLayout,
    HostPool,
    build_info,
    parse_bytes,
    parse_device,
)

__all__ = [
    "ExpertCache",
    "ExpertLayout",
    "HostPool",
    "OffloadHandle",
    "build_info",
    "offload",
    "parse_bytes",
    "parse_device",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # offload() needs torch and transformers; the core does not, so they load on first use.
    if name in ("offload", "OffloadHandle"):
        from expertflow import offloading

        return getattr(offloading, name)
    raise AttributeError(f"module 'expertflow' has no attribute {name!r}")
