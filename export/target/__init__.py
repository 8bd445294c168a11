"""Target-CPU verification: run a bundle in an emulated aarch64 userland with the device engine."""
