"""Host readiness: checks, repairs and kernel BPF feature probes.

Services call ``require("kprobe")`` (or any name from ``KernelFeatures.flat()``) before loading
something that needs it, and report ``kernel_features().to_dict()`` in their status.
"""

from ciliate.doctor.fix import cgroup2_root
from ciliate.doctor.probes import (
    CAPABILITIES,
    KernelFeatures,
    MissingKernelFeature,
    kernel_features,
    probe_kernel,
    require,
)

__all__ = [
    "CAPABILITIES",
    "KernelFeatures",
    "MissingKernelFeature",
    "cgroup2_root",
    "kernel_features",
    "probe_kernel",
    "require",
]
