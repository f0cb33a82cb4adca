"""Getting artifacts to a device: the verified bundle, the benchmark kit, and the SSH layer under both."""
