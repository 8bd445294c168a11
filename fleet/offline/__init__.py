"""Offline field deployments, fleet side: update packages out, telemetry exports in (docs/offline.md)."""
