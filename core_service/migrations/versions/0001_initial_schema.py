"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:

    op.create_table('location',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('endpoint', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('listen_port', sa.Integer(), nullable=False),
    sa.Column('network', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('gateway_address', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('wg_public_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('wg_private_key_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sealing_public_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sealing_private_key_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('mfa_mode', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('peer_disconnect_threshold_s', sa.Integer(), nullable=False),
    sa.Column('session_lifetime_s', sa.Integer(), nullable=False),
    sa.Column('keepalive_s', sa.Integer(), nullable=False),
    sa.Column('allowed_groups', sa.JSON(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('payload', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('published_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_unpublished', ['id'], unique=False, sqlite_where=sa.text('published_at IS NULL'), postgresql_where=sa.text('published_at IS NULL'))

    op.create_table('user',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=False),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('totp_secret_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('totp_pending_secret_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('totp_last_step', sa.Integer(), nullable=True),
    sa.Column('email_mfa_enabled', sa.Boolean(), nullable=False),
    sa.Column('mfa_failures', sa.Integer(), nullable=False),
    sa.Column('mfa_locked_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('oidc_issuer', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('oidc_subject', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('oidc_issuer', 'oidc_subject', name='uq_user_oidc_identity'),
    sa.UniqueConstraint('username')
    )
    op.create_table('device',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('pubkey', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('pubkey'),
    sa.UniqueConstraint('user_id', 'name', name='uq_device_user_name')
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_user_id'), ['user_id'], unique=False)

    op.create_table('location_device',
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('address', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['location_id'], ['location.id'], ),
    sa.PrimaryKeyConstraint('location_id', 'device_id'),
    sa.UniqueConstraint('location_id', 'address', name='uq_location_device_address')
    )
    op.create_table('mfa_login',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('challenge', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('email_code_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('failed_attempts', sa.Integer(), nullable=False),
    sa.Column('client_ip', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['location_id'], ['location.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mfa_login_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_mfa_login_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_mfa_login_user_id'), ['user_id'], unique=False)
        batch_op.create_index('uq_mfa_login_live', ['location_id', 'device_id'], unique=True, sqlite_where=sa.text("state IN ('pending', 'approved')"), postgresql_where=sa.text("state IN ('pending', 'approved')"))

    op.create_table('mobile_key',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('public_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id'),
    sa.UniqueConstraint('public_key')
    )
    with op.batch_alter_table('mobile_key', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mobile_key_user_id'), ['user_id'], unique=False)

    op.create_table('vpn_session',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('location_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('login_id', sa.Uuid(), nullable=True),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('psk_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('authorized_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('connected_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('revoke_reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['location_id'], ['location.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('location_id', 'device_id', 'generation', name='uq_vpn_session_generation')
    )
    with op.batch_alter_table('vpn_session', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vpn_session_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_vpn_session_user_id'), ['user_id'], unique=False)
        batch_op.create_index('uq_vpn_session_live', ['location_id', 'device_id'], unique=True, sqlite_where=sa.text("state IN ('authorized', 'connected')"), postgresql_where=sa.text("state IN ('authorized', 'connected')"))




def downgrade() -> None:

    with op.batch_alter_table('vpn_session', schema=None) as batch_op:
        batch_op.drop_index('uq_vpn_session_live', sqlite_where=sa.text("state IN ('authorized', 'connected')"), postgresql_where=sa.text("state IN ('authorized', 'connected')"))
        batch_op.drop_index(batch_op.f('ix_vpn_session_user_id'))
        batch_op.drop_index(batch_op.f('ix_vpn_session_device_id'))

    op.drop_table('vpn_session')
    with op.batch_alter_table('mobile_key', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mobile_key_user_id'))

    op.drop_table('mobile_key')
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.drop_index('uq_mfa_login_live', sqlite_where=sa.text("state IN ('pending', 'approved')"), postgresql_where=sa.text("state IN ('pending', 'approved')"))
        batch_op.drop_index(batch_op.f('ix_mfa_login_user_id'))
        batch_op.drop_index(batch_op.f('ix_mfa_login_expires_at'))
        batch_op.drop_index(batch_op.f('ix_mfa_login_device_id'))

    op.drop_table('mfa_login')
    op.drop_table('location_device')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_user_id'))

    op.drop_table('device')
    op.drop_table('user')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_unpublished', sqlite_where=sa.text('published_at IS NULL'), postgresql_where=sa.text('published_at IS NULL'))

    op.drop_table('outbox')
    op.drop_table('location')

