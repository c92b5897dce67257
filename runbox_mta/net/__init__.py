"""Networking shared by every protocol: binding, admission limits, draining."""
