"""lifecycle: tombstones for users, devices and locations; routed networks and DNS of a
location; the latest stats sample per peer

Revision ID: 0012_lifecycle
Revises: 0013_hardening
Create Date: 2026-11-25
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0012_lifecycle'
down_revision: Union[str, None] = '0013_hardening'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.add_column(sa.Column('removed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('location', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allowed_ips', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('dns', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('removed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    op.create_table('peer_stat',
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('gateway_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('pubkey', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('endpoint', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('handshake_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('rx_bytes', sa.BigInteger(), nullable=False, server_default='0'),
    sa.Column('tx_bytes', sa.BigInteger(), nullable=False, server_default='0'),
    sa.Column('sampled_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('location_id', 'gateway_id', 'pubkey')
    )
    with op.batch_alter_table('peer_stat', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_peer_stat_sampled_at'), ['sampled_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('peer_stat', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_peer_stat_sampled_at'))
    op.drop_table('peer_stat')
    with op.batch_alter_table('location', schema=None) as batch_op:
        batch_op.drop_column('removed_at')
        batch_op.drop_column('dns')
        batch_op.drop_column('allowed_ips')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_column('removed_at')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
