"""oidc provider and login flow

Revision ID: 0011_oidc
Revises: 0010_enrollment
Create Date: 2026-11-25 18:06:43.074356
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0011_oidc'
down_revision: Union[str, None] = '0010_enrollment'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('oidc_provider',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('issuer', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('client_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('client_secret_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('display_name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('scopes', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('redirect_uri', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('authorization_endpoint', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('token_endpoint', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('userinfo_endpoint', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('jwks_uri', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('jwks', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('signing_algs', sa.JSON(), nullable=False),
    sa.Column('iss_parameter_supported', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.add_column(sa.Column('oidc_state_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('oidc_browser_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('oidc_nonce', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('oidc_verifier_enc', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_index('uq_mfa_login_oidc_state', ['oidc_state_hash'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('mfa_login', schema=None) as batch_op:
        batch_op.drop_index('uq_mfa_login_oidc_state')
        batch_op.drop_column('oidc_verifier_enc')
        batch_op.drop_column('oidc_nonce')
        batch_op.drop_column('oidc_browser_hash')
        batch_op.drop_column('oidc_state_hash')

    op.drop_table('oidc_provider')
