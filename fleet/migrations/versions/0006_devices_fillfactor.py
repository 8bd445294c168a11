"""devices: fillfactor 50 on PostgreSQL, so the per-message update of a device row stays on its page

Every telemetry message updates its device's row (last seen, last telemetry). With the default fillfactor
(100) a full page cannot take the new row version, so the update is not HOT: a new tuple on another page, new
index entries, and a dead tuple that only VACUUM reclaims. Measured at 10,000 devices and 2,000 messages/s
(docs/benchmarks.md, "Fleet at scale"): the table grew from 398 to 882 MB in a 5-minute run with autovacuum
off, and the dashboard overview's scan of it took 776 ms; at fillfactor 50 over 99% of the updates are HOT,
pruned on the page without VACUUM, and the table stayed at 39-48 MB. Existing pages keep their layout until
the table is rewritten (``VACUUM FULL devices``); SQLite has no such setting.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 18:40:00

"""

from collections.abc import Sequence
from typing import Union

from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

DEVICES_FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE devices SET (fillfactor = {DEVICES_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE devices RESET (fillfactor)")
