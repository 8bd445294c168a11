"""Offline field deployments: update packages and telemetry carried on removable media (docs/offline.md).

What is on the stick is the contract's (``manifests.offline``: format, media helpers, errors), shared
with ``fleet.offline``. Modules here: ``package`` (checks before install), ``install`` (runs the agent's
update state machine from a stick), ``watcher`` (automatic pickup inside the running agent),
``telemetry`` (export of the store-and-forward queue), ``cli``.
Kept import-free here: ``device.agent.config`` imports ``device.offline.config``.
"""
