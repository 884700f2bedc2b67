"""Tests of latency_tables: measurement protocol, backends, device fingerprint."""
