"""Pure parts of the Kubernetes sync and the CNI plugin: no I/O, unit-tested."""
