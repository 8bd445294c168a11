"""What travels on removable media between the fleet and its offline boards (docs/offline.md).

``format``: the update package and the telemetry export file; ``media``: free space and all-or-nothing
publication on a stick that can be pulled at any moment; ``errors``: one tree, each error with a reason.
"""
