"""devices.public_key: each board's own ed25519 public key, registered at enrolment

It verifies the board's offline telemetry exports (docs/offline.md). Boards enrolled before have none
(NULL): their exports are refused until they are enrolled again with a key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00

"""

from collections.abc import Sequence
from typing import Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("public_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("public_key")
