"""graft's web page (`/`) and `/docs` in a real headless Chromium, driven by Playwright, against
a real `graft serve` on loopback.

The browser is Debian's `chromium` package (or GRAFT_CHROMIUM), launched through Playwright's
`executable_path`: `playwright install` downloads a browser build from outside the package
registries. Without a browser these tests skip with a message saying how to install one.

What the page shows is compared with what the API answers for the same bytes, so the page
cannot drift from the API. Every test also checks, when its page closes, that the browser
fetched nothing from any other origin and that the Content-Security-Policy refused nothing.
"""

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.server import RunningServer, paused_inference, running_server
from support.trained import tinted_photo

from service.protocol.http.pages import ASSETS, PAGES

pytestmark = pytest.mark.slow
STATIC = Path(__file__).resolve().parents[1] / "service/protocol/http/static"
TOKEN = "test-admin-token-0123456789"
TIMEOUT_MS = 60_000  # a contended machine: generous waits for what must happen
REQUEST_TIMEOUT_S = 10  # the server's deadline, reached on purpose by the 5xx test
NOT_AN_IMAGE = b"these are notes, not an image\n" * 4
# A URL with a host: http(s): or protocol-relative (a quote, paren or = before //).
OUTSIDE = re.compile(r"""https?:|["'(=]\s*//""", re.I)
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.I)


def chromium_path() -> str | None:
    return os.environ.get("GRAFT_CHROMIUM") or shutil.which("chromium")


# -- the shipped files, without a browser ---------------------------------------------------


def test_graft_own_page_files_name_no_other_host() -> None:
    own = [STATIC / name for name in PAGES.values()]
    own += [path for path, _ in ASSETS.values() if path.parent == STATIC]
    assert len(own) == 5, own
    for path in own:
        found = OUTSIDE.search(path.read_text())
        assert found is None, f"{path.name} names another host: {found.group(0)!r}"


def test_every_file_a_page_references_is_served_and_nothing_else() -> None:
    referenced: set[str] = set()
    for name in PAGES.values():
        referenced |= set(REFERENCE.findall((STATIC / name).read_text()))
    links = {"docs", "./", "openapi.json", "data:,"}  # pages, the document, the empty icon
    assets = {f"static/{name}" for name in ASSETS}
    assert referenced - links == assets


# -- a real server and a real browser ------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no Chromium to drive: apt-get install chromium (Debian), or set GRAFT_CHROMIUM "
            "to a Chromium binary"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(browser: Any, request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    # `browser` first, and the (session) model only then: without a browser, the tests skip
    # before anything is trained or started. The model worker runs apart from the entry, so
    # that the 5xx test can pause it (the entry serves the pages).
    model_root = request.getfixturevalue("colour_model_root")
    env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}
    with running_server(
        model_root, default_model="colours", separate_inference=True, env=env
    ) as running:
        yield running


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=120) as client:
        yield client


@pytest.fixture
def page(browser: Any, server: RunningServer) -> Iterator[Any]:
    """A fresh browser tab; on close, nothing may have left the server's origin."""
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    errors: list[str] = []
    tab.on("request", lambda request: requested.append(request.url))
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.add_init_script(
        "window.__refused = []; document.addEventListener('securitypolicyviolation', "
        "(e) => window.__refused.push(`${e.violatedDirective} ${e.blockedURI}`));"
    )
    yield tab
    refused = tab.evaluate("window.__refused || []")
    context.close()
    home = (f"{server.http}/", "data:", "blob:")
    assert [url for url in requested if not url.startswith(home)] == []
    assert requested, "the page fetched nothing at all"
    assert refused == [], "the Content-Security-Policy refused something the page loads"
    assert errors == [], "the page threw"


def open_page(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.http}/")
    page.wait_for_selector("body[data-ready='true']")


def choose(page: Any, files: dict[str, bytes]) -> None:
    payload = [{"name": n, "mimeType": "image/jpeg", "buffer": b} for n, b in files.items()]
    page.set_input_files("#files", files=payload)


def drop(page: Any, name: str, data: bytes) -> None:
    """A file dropped on the zone, as a real drag from the desktop delivers it."""
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const zone = document.getElementById("drop");
            for (const type of ["dragenter", "dragover", "drop"]) {
                const event = new DragEvent(type, { bubbles: true, cancelable: true,
                                                    dataTransfer: transfer });
                zone.dispatchEvent(event);
            }
        }""",
        [name, base64.b64encode(data).decode()],
    )


def classify(api: httpx.Client, images: list[bytes], **fields: str) -> httpx.Response:
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return api.post("/classify", files=files, data=fields)


def shown_cards(page: Any) -> list[dict[str, Any]]:
    page.wait_for_selector("#results .card")
    return page.eval_on_selector_all(
        "#results .card",
        """cards => cards.map((card) => ({
            label: card.querySelector(".verdict .label").textContent,
            bars: [...card.querySelectorAll(".bar")].map((bar) => [
                bar.querySelector(".name").textContent,
                parseFloat(bar.querySelector(".value").textContent),
            ]),
            ood: card.querySelector(".ood").textContent,
        }))""",
    )


def assert_shows(cards: list[dict[str, Any]], answer: dict[str, Any]) -> None:
    """The page's cards say what the API answered: labels, top-k order and scores, OOD flag."""
    assert len(cards) == len(answer["results"])
    for card, result in zip(cards, answer["results"], strict=True):
        assert card["label"] == result["label"]
        assert [name for name, _ in card["bars"]] == [top["label"] for top in result["top_k"]]
        for (_, shown), top in zip(card["bars"], result["top_k"], strict=True):
            assert shown == pytest.approx(top["score"] * 100, abs=0.051)
        flag = result.get("in_distribution")
        expected = {True: "in distribution", False: "unlike the training images"}.get(
            flag, "no in-distribution check in this version"
        )
        assert card["ood"].startswith(expected), card["ood"]


def assert_heatmaps(page: Any, api: httpx.Client, images: list[bytes]) -> None:
    """A rendered heatmap per image where /explain answers; its own message where it cannot."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('.heatmap')]"
        ".every((h) => !h.textContent.includes('Computing'))"
    )
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    explained = api.post("/explain", files=files)
    if explained.status_code == 200:
        sizes = page.eval_on_selector_all(
            ".heatmap-image", "images => images.map((i) => i.complete && i.naturalWidth)"
        )
        assert len(sizes) == len(images)
        assert all(size and size > 0 for size in sizes), sizes
        return
    notes = page.eval_on_selector_all(".heatmap .note", "notes => notes.map((n) => n.textContent)")
    assert len(notes) == len(images)
    message = explained.json()["message"]
    no_route = explained.status_code in (404, 405) and "route" in message
    expected = "This server has no POST /explain" if no_route else f"No heatmap: {message}"
    assert all(note.startswith(expected) for note in notes), (notes, explained.text)


def shown_error(page: Any) -> tuple[str, str]:
    page.wait_for_selector("#error:not([hidden])")
    return page.text_content("#error-message") or "", page.text_content("#error-detail") or ""


def test_chosen_files_show_the_answer_bars_flag_and_heatmap(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    images = {"red.jpg": tinted_photo("red"), "blue.jpg": tinted_photo("blue")}
    open_page(page, server)
    choose(page, images)
    cards = shown_cards(page)
    answer = classify(api, list(images.values()), top_k="5").json()
    assert [card["label"] for card in cards] == ["red", "blue"]
    assert_shows(cards, answer)
    assert page.text_content("#answer-title") == f"{answer['model']}, version {answer['version']}"
    assert_heatmaps(page, api, list(images.values()))


def test_a_dropped_file_is_classified(page: Any, server: RunningServer, api: httpx.Client) -> None:
    open_page(page, server)
    page.fill("#top-k", "2")
    drop(page, "green.jpg", tinted_photo("green"))
    cards = shown_cards(page)
    assert_shows(cards, classify(api, [tinted_photo("green")], top_k="2").json())
    assert cards[0]["label"] == "green"
    assert len(cards[0]["bars"]) == 2
    assert_heatmaps(page, api, [tinted_photo("green")])


def test_a_model_and_version_are_picked_from_the_api(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    open_page(page, server)
    page.click("#admin summary")
    page.fill("#token", "wrong-token")
    page.click("#list-models")
    page.wait_for_function("() => document.getElementById('model-note').textContent !== ''")
    wrong = api.get("/models", headers={"authorization": "Bearer wrong-token"})
    assert page.text_content("#model-note") == wrong.json()["message"]
    page.fill("#token", TOKEN)
    page.click("#list-models")
    page.wait_for_selector("#model-names option[value='colours']", state="attached")
    page.fill("#model", "colours")
    page.press("#model", "Tab")  # `change`: the versions come from GET /v1/models/colours
    page.wait_for_selector("#version option[value='1']", state="attached")
    page.select_option("#version", "1")
    page.uncheck("#explain")
    choose(page, {"red.jpg": tinted_photo("red")})
    assert_shows(shown_cards(page), classify(api, [tinted_photo("red")], version="1").json())
    assert page.text_content("#answer-title") == "colours, version 1"
    assert page.text_content(".heatmap .note") == "Heatmap off."


def test_an_unknown_model_shows_the_servers_message(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    open_page(page, server)
    page.fill("#model", "no-such-model")
    page.press("#model", "Tab")
    page.wait_for_function("() => document.getElementById('model-note').textContent !== ''")
    status = api.get("/v1/models/no-such-model")
    assert page.text_content("#model-note") == status.json()["message"]
    choose(page, {"red.jpg": tinted_photo("red")})
    message, detail = shown_error(page)
    refused = classify(api, [tinted_photo("red")], model="no-such-model")
    assert refused.status_code == 404
    assert message == refused.json()["message"]
    assert detail == f"HTTP 404 · {refused.json()['error']}"
    assert page.is_hidden("#answer")


def test_a_bad_file_shows_the_servers_message_and_the_next_good_one_works(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    open_page(page, server)
    choose(page, {"notes.jpg": NOT_AN_IMAGE})
    message, detail = shown_error(page)
    refused = classify(api, [NOT_AN_IMAGE])
    assert 400 <= refused.status_code < 500, refused.text
    assert message == refused.json()["message"] != ""
    assert detail == f"HTTP {refused.status_code} · {refused.json()['error']}"
    choose(page, {"red.jpg": tinted_photo("red")})
    assert shown_cards(page)[0]["label"] == "red"
    assert page.is_hidden("#error")
    assert api.get("/livez").status_code == 200


def test_a_server_error_shows_its_message_never_a_blank(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    open_page(page, server)
    page.uncheck("#explain")
    # The model worker frozen: the request reaches its deadline, whatever the machine's speed.
    with paused_inference(server):
        choose(page, {"red.jpg": tinted_photo("red")})
        message, detail = shown_error(page)
    assert detail == "HTTP 504 · deadline_exceeded"
    assert "GRAFT_REQUEST_TIMEOUT_S" in message, message
    choose(page, {"red.jpg": tinted_photo("red")})
    assert shown_cards(page)[0]["label"] == "red"


def test_docs_render_every_operation_of_the_document(
    page: Any, server: RunningServer, api: httpx.Client
) -> None:
    document = api.get("/openapi.json").json()
    verbs = {"get", "put", "post", "delete", "patch", "head", "options"}
    expected = sorted(
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in verbs
    )
    page.goto(f"{server.http}/docs")
    page.wait_for_selector(".opblock")
    shown = page.eval_on_selector_all(
        ".opblock",
        """blocks => blocks.map((b) => [
            b.querySelector(".opblock-summary-method").textContent,
            b.querySelector(".opblock-summary-path").dataset.path,
        ])""",
    )
    assert sorted(tuple(pair) for pair in shown) == expected
    assert page.query_selector(".errors-wrapper") is None, page.text_content(".errors-wrapper")
    page.click(".opblock-post .opblock-summary")  # an operation opens: its body renders
    page.wait_for_selector(".opblock-body")
