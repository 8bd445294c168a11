"""fleet_nodes (servers sharing the database, fleet/lease.py); indexes for 10,000-device fleets

- ``fleet_nodes``: each fleet server's id and broker session client ids, so the rollout lease holder can
  drain the sessions of a server that died.
- ``ix_devices_enrolled_at_id``: the paginated devices list (keyset on enrolled_at, id).
- ``ix_telemetry_device_id_ts`` replaces ``ix_telemetry_device_id``: a device's newest samples without a
  sort, and one index fewer to maintain per inserted sample (the unique key already leads with device_id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00

"""

from collections.abc import Sequence
from typing import Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "fleet_nodes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("client_ids", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("ix_devices_enrolled_at_id", ["enrolled_at", "id"], unique=False)
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_device_id_ts", ["device_id", "ts"], unique=False)
        batch_op.drop_index("ix_telemetry_device_id")


def downgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_device_id", ["device_id"], unique=False)
        batch_op.drop_index("ix_telemetry_device_id_ts")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("ix_devices_enrolled_at_id")
    op.drop_table("fleet_nodes")
