"""Per-board variants: releases, board capabilities, each target's resolved variant

``releases`` holds release documents (manifests/variants.py); ``devices.capabilities`` what a board sent at
enrolment; ``deployments.release_name/version`` a deployment of a release; ``deployment_targets.variant,
bundle_name, bundle_version`` the variant resolved for that device (NULL: the deployment's own bundle).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:00:00

"""

from collections.abc import Sequence
from typing import Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_releases_name_version"),
    )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("capabilities", sa.JSON(), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("release_name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("release_version", sa.Integer(), nullable=True))
    with op.batch_alter_table("deployment_targets") as batch:
        batch.add_column(sa.Column("variant", sa.String(64), nullable=True))
        batch.add_column(sa.Column("bundle_name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("bundle_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_targets") as batch:
        batch.drop_column("bundle_version")
        batch.drop_column("bundle_name")
        batch.drop_column("variant")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("release_version")
        batch.drop_column("release_name")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("capabilities")
    op.drop_table("releases")
