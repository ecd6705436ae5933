"""Helpers for testing ckptstore and code built on it (optional dependencies, imported on use).

``ckptstore.testing.s3``: a moto S3 server on loopback, with a fault-injecting front end that can answer 500s,
drop connections and count the bytes each request moved.
"""
