"""The Alembic migrations build exactly the schema the models describe."""
from __future__ import annotations

import os
import subprocess
import sys

from core_service.db import PACKAGE_DIR, upgrade_schema


def test_alembic_check_reports_no_drift(database_url: str) -> None:
    upgrade_schema(database_url)
    env = dict(os.environ, WGMFA_DATABASE_URL=database_url)
    alembic = [sys.executable, "-m", "alembic", "-c", str(PACKAGE_DIR / "alembic.ini")]
    check = subprocess.run([*alembic, "check"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout
    downgrade = subprocess.run([*alembic, "downgrade", "base"], env=env, capture_output=True, text=True)
    assert downgrade.returncode == 0, downgrade.stderr
    upgrade_schema(database_url)  # and back up again
