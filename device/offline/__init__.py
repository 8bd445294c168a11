"""Offline field deployments: update packages and telemetry carried on removable media (docs/offline.md).

What is on the stick is the contract's (``manifests.offline``: format, media helpers, errors), shared
with ``fleet.offline``. Modules here: ``package`` (checks before install), ``install`` (runs the agent's
update state machine from a stick), ``watcher`` (automatic pickup inside the running agent),
``telemetry`` (export of the store-and-forward queue), ``cli``.
It builds on ``device.agent`` (config, update record, Updater wiring), never the reverse: the running agent
gets the watcher as an extension from the composition root (``device/cli.py``).
"""
