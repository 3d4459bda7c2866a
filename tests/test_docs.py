"""README documents every setting the processes read, and nothing they do not."""
from __future__ import annotations

import re

from core_service.settings import CoreSettings
from gateway_worker.settings import GatewaySettings
from proxy_service.settings import ProxySettings
from reaper_worker.app import ReaperSettings
from tests.support.stack import REPO
from wgmfa.up import UpSettings

SETTINGS = [CoreSettings, ProxySettings, UpSettings, GatewaySettings, ReaperSettings]


def settings_variables() -> set[str]:
    names = set()
    for model in SETTINGS:
        prefix = model.model_config.get("env_prefix", "")
        names.update(f"{prefix}{field}".upper() for field in model.model_fields)
    return names


def test_readme_settings_table_matches_the_settings_models() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `WGMFA_")]
    documented = {name for cell in first_cells for name in re.findall(r"`(WGMFA_[A-Z0-9_]+)`", cell)}
    assert documented == settings_variables()


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert "scripts/up" in first_block and "scripts/test" in first_block
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
