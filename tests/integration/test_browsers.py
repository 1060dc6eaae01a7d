"""What a browser sees, in headless Chromium against the real server: ``/docs`` and ``/playground``, with every
request to anywhere but the server blocked (the pages must work without internet)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from tests.browsers import artifact, chromium_executable
from tests.servers import Server

_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_executable()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    page: Page
    outside: list[str] = field(default_factory=list)  # requests for anything not on the server (all blocked)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page

    def assert_clean(self) -> None:
        assert self.outside == []
        assert self.errors == []


def open_tab(browser: Browser, server: Server, path: str) -> Tab:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(60_000)
    tab = Tab(context.new_page())

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(f"{server.url}/"):
            route.continue_()
        else:
            tab.outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
    tab.page.goto(f"{server.url}{path}")
    return tab


# ---- /docs ----


def test_docs_page_loads_only_files_the_server_serves(server: Server) -> None:
    html = httpx.get(f"{server.url}/docs", timeout=30).text
    assert "http://" not in html and "https://" not in html
    urls = re.findall(r"<(?:script|link)\b[^>]*?\b(?:src|href)=['\"]([^'\"]+)", html)
    assert sorted(urls) == [
        "/docs/assets/favicon-32x32.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui-standalone-preset.js",
        "/docs/assets/swagger-ui.css",
    ]
    for url in urls:
        r = httpx.get(f"{server.url}{url}", timeout=30)
        assert r.status_code == 200, url
        assert r.headers["content-type"].startswith(_TYPES[url[url.rfind(".") :]]), url
        assert len(r.content) > 500, url


def test_docs_render_every_operation_without_internet(browser: Browser, server: Server) -> None:
    document = httpx.get(f"{server.url}/docs/openapi.json", timeout=30).json()
    operations = sorted(
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item if method in _METHODS
    )
    tab = open_tab(browser, server, "/docs")
    tab.page.wait_for_function(f"document.querySelectorAll('.opblock').length === {len(operations)}")
    shown = tab.page.eval_on_selector_all(
        ".opblock-summary",
        "blocks => blocks.map(b => b.querySelector('.opblock-summary-method').textContent + ' '"
        " + b.querySelector('.opblock-summary-path').dataset.path)",
    )
    assert sorted(shown) == operations
    # The page shows the document /docs/openapi.json serves (msgspec's schemas), not Litestar's own rendering.
    assert tab.page.evaluate("ui.specSelectors.specJson().toJS()") == document
    tab.assert_clean()


# ---- /playground ----


def _watch_streaming(page: Page) -> None:
    """Record the length of the answer's text each time it changes while it is still streaming."""
    page.evaluate(
        """() => {
          window.seen = [];
          new MutationObserver(() => {
            const answers = document.querySelectorAll('.message.assistant');
            const answer = answers[answers.length - 1];
            if (answer && answer.classList.contains('streaming'))
              window.seen.push(answer.querySelector('.content').textContent.length);
          }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )


def _ask(page: Page, text: str) -> dict[str, str]:
    """Send ``text``; wait for the streamed answer and its stats; the stats by name."""
    answers = page.locator(".message.assistant")
    before = answers.count()
    _watch_streaming(page)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    answer = answers.nth(before)
    answer.locator(".stats").wait_for()
    seen = page.evaluate("window.seen")
    # The text grew piece by piece before the answer was complete: it streamed.
    assert len(set(seen)) >= 3, seen
    assert seen == sorted(seen)
    assert seen[-1] <= len(answer.locator(".content").text_content() or "")
    assert "failed" not in (answer.get_attribute("class") or "")
    stats = answer.locator(".stat")
    return {
        stats.nth(i).get_attribute("data-stat") or "": (stats.nth(i).text_content() or "") for i in range(stats.count())
    }


def _tokens(stat: str) -> int:
    match = re.fullmatch(r"\S+ (\d+) tokens", stat)
    assert match, stat
    return int(match.group(1))


def test_index_names_the_playground(server: Server) -> None:
    root = httpx.get(server.url, timeout=30).json()
    assert root["playground"] == "/playground"
    assert "GET /playground" in root["endpoints"]
    page = httpx.get(f"{server.url}/playground", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text


def test_playground_streams_answers_and_manages_caches(browser: Browser, server: Server) -> None:
    tab = open_tab(browser, server, "/playground")
    page = tab.page
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    assert page.locator("#model option").all_text_contents() == ["tiny", "tiny-short"]
    page.fill("#max-tokens", "32")

    stats = _ask(page, "Hello! Who are you?")
    assert re.fullmatch(r"TTFT \d+ ms", stats["TTFT"]), stats
    assert re.fullmatch(r"tokens/s \d+\.\d", stats["tokens/s"]), stats
    assert 1 <= _tokens(stats["completion"]) <= 32
    assert _tokens(stats["prompt"]) > 0
    assert _tokens(stats["cached"]) == 0
    assert "x-prefix-cache" not in stats

    # A cache from a system prompt, through the page; the server has it.
    name = f"playground-{uuid.uuid4().hex[:8]}"
    page.fill("#cache-name", name)
    page.fill("#cache-system", "You are a terse assistant for the mlx-gateway project. Answer in one sentence.")
    page.click("#create")
    page.locator(f"#caches li[data-name='{name}']").wait_for()
    built = httpx.get(f"{server.url}/admin/prefix-caches/{name}", timeout=30).json()
    assert page.input_value("#cache") == name  # picked for the chat
    assert re.fullmatch(
        rf"Built {name}: {built['num_tokens']} tokens in \d+\.\d\d s\.", page.inner_text("#cache-status")
    )

    page.click("#clear")
    stats = _ask(page, "What do you do?")
    assert _tokens(stats["cached"]) == built["num_tokens"]
    assert _tokens(stats["prompt"]) > built["num_tokens"]
    assert stats["x-prefix-cache"].startswith(f"x-prefix-cache name={name}; form=prepended; hit=true;")
    page.screenshot(path=artifact("playground.png"))

    # The server's own message when it refuses.
    page.fill("#cache-name", "no spaces allowed")
    page.click("#create")
    refused = httpx.post(
        f"{server.url}/admin/prefix-caches",
        json={"name": "no spaces allowed", "model": "tiny", "messages": [{"role": "system", "content": "x"}]},
        timeout=30,
    ).json()["error"]["message"]
    page.wait_for_function("document.getElementById('cache-status').classList.contains('error')")
    assert page.inner_text("#cache-status") == refused

    page.click(f"#caches li[data-name='{name}'] button.delete")
    page.locator(f"#caches li[data-name='{name}']").wait_for(state="detached")
    assert page.inner_text("#cache-status") == f"Deleted {name}."
    assert httpx.get(f"{server.url}/admin/prefix-caches/{name}", timeout=30).status_code == 404
    assert name not in page.eval_on_selector_all("#cache option", "options => options.map(o => o.value)")
    tab.assert_clean()


def test_playground_takes_an_api_key_and_keeps_it(browser: Browser, auth_server: Server) -> None:
    tab = open_tab(browser, auth_server, "/playground")
    page = tab.page
    page.wait_for_function("document.getElementById('chat-status').textContent !== ''")
    assert page.inner_text("#chat-status") == "Models: Missing API key: send 'Authorization: Bearer <key>'"
    assert page.locator("#model option").count() == 0

    page.fill("#api-key", "key-alpha")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    assert page.inner_text("#chat-status") == ""
    stats = _ask(page, "Hi")
    assert re.fullmatch(r"TTFT \d+ ms", stats["TTFT"])

    page.reload()  # the key is kept in the browser
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    assert page.input_value("#api-key") == "key-alpha"

    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("document.getElementById('chat-status').textContent !== ''")
    assert page.inner_text("#chat-status") == "Models: Incorrect API key provided"
    tab.assert_clean()
