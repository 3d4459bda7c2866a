"""A real browser for the tests: Debian's headless Chromium (installed by
`scripts/install.sh --test`), driven with Playwright (no browser download)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


async def page_in_chromium(page_url: str, settled_text: str, work_dir: Path, timeout_s: float = 60) -> tuple[str, bool]:
    """Open a page and wait until it shows `settled_text`: (its text, whether its
    authenticate button is visible)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install.sh --test)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   timeout=timeout_s * 1000)
        try:
            page = await browser.new_page()
            page.set_default_timeout(timeout_s * 1000)
            await page.goto(page_url)
            await page.get_by_text(settled_text).wait_for()
            return await page.locator("main").inner_text(), await page.locator("#authenticate").is_visible()
        finally:
            await browser.close()


async def log_in_with_chromium(page_url: str, login: str, work_dir: Path, timeout_s: float = 60) -> str:
    """Open the proxy's OIDC page, press its button, sign in and consent at the provider,
    and return the text of the page the browser lands on."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install.sh --test)")
    from playwright.async_api import async_playwright

    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=work_dir))
    timeout_ms = timeout_s * 1000
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=timeout_ms
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.set_default_timeout(timeout_ms)
                await page.goto(page_url)
                button = page.get_by_role("link", name="Authenticate with")
                await button.wait_for(state="visible")
                await button.click()
                await page.locator('input[name="login"]').fill(login)
                await page.locator('input[name="password"]').fill("any password")
                await page.get_by_role("button", name="Sign-in").click()
                await page.get_by_role("button", name="Continue").click()
                await page.wait_for_url("**/openid/mfa/callback**")
                await page.get_by_text("You can close this window").or_(page.get_by_text("VPN login failed")).wait_for()
                return await page.locator("main").inner_text()
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
