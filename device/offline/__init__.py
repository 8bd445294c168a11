"""Offline field deployments: update packages and telemetry carried on removable media (docs/offline.md).

Modules: ``format`` (what is on the stick, shared with ``fleet.offline``), ``package`` (checks before
install), ``install`` (runs the agent's update state machine from a stick), ``watcher`` (automatic pickup
inside the running agent), ``telemetry`` (export of the store-and-forward queue), ``cli``.
Kept import-free here: ``device.agent.config`` imports ``device.offline.config``.
"""
