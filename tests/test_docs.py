"""The documentation says what the code does: docs/settings.md lists every setting the
processes read and nothing they do not, README opens with the two commands CI runs and
links only to documents that exist, and docs/openapi.json is the document the proxy serves."""
from __future__ import annotations

import re

from core_service.settings import CoreSettings
from gateway_worker.settings import GatewaySettings
from proxy_service.openapi import render, served_document
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


def test_settings_table_matches_the_settings_models() -> None:
    table = (REPO / "docs" / "settings.md").read_text()
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `WGMFA_")]
    documented = {name for cell in first_cells for name in re.findall(r"`(WGMFA_[A-Z0-9_]+)`", cell)}
    assert documented == settings_variables()


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert "scripts/up" in first_block and "scripts/test" in first_block
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_every_document_linked_from_the_docs_exists() -> None:
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.relative_to(REPO)} links to {target}, which does not exist"


async def test_checked_in_openapi_document_is_the_one_the_proxy_serves() -> None:
    checked_in = (REPO / "docs" / "openapi.json").read_text()
    assert checked_in == render(await served_document()), (
        "docs/openapi.json is stale: run python -m proxy_service.openapi --write docs/openapi.json"
    )
