"""login hardening: attempts spent before checking, failures per client address, a few
live logins per device

Revision ID: 0013_hardening
Revises: 0011_oidc
Create Date: 2026-11-25
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0013_hardening'
down_revision: Union[str, None] = '0011_oidc'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_LIVE_LOGIN = sa.text("state IN ('pending', 'approved')")


def upgrade() -> None:
    op.create_table('mfa_address_failures',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('client_ip', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('locked_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('user_id', 'client_ip')
    )
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.drop_index('uq_mfa_login_live', sqlite_where=_LIVE_LOGIN, postgresql_where=_LIVE_LOGIN)
        batch_op.create_index('ix_mfa_login_live', ['location_id', 'device_id'], unique=False,
                              sqlite_where=_LIVE_LOGIN, postgresql_where=_LIVE_LOGIN)
    # the model has no server default: the column is always written by the core
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.alter_column('attempts', server_default=None)


def downgrade() -> None:
    # more than one live login per device cannot go back under the unique index
    op.execute("UPDATE mfa_login SET state = 'expired' WHERE state IN ('pending', 'approved')")
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.drop_index('ix_mfa_login_live', sqlite_where=_LIVE_LOGIN, postgresql_where=_LIVE_LOGIN)
        batch_op.create_index('uq_mfa_login_live', ['location_id', 'device_id'], unique=True,
                              sqlite_where=_LIVE_LOGIN, postgresql_where=_LIVE_LOGIN)
        batch_op.drop_column('attempts')
    op.drop_table('mfa_address_failures')
