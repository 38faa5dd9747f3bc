"""The web console in a real browser (Debian's chromium driven by Playwright) against real
clusters: login, the certificates table, replace by file upload with the live per-node view,
validation errors, roles, hostile certificate text, and replacing `cm` under an open page.

Chromium does not trust the cluster CA (``ignore_https_errors``); which certificate the console
serves is proven separately, by TLS handshakes (:func:`clusterkit.served_fingerprint`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from certfactory import CA, Leaf, self_signed
from clusterkit import (
    accepts,
    api,
    desired_fingerprints,
    served_by_node,
    served_fingerprint,
    thaw,
    wait_until,
)
from conftest import ADMIN_PASSWORD, start_cluster
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from clustercert.clock import utc_now
from clustercert.control.directory import init_cluster
from clustercert.demo import DemoCluster, free_port
from clustercert.errors import ConfigError
from clustercert.names import NAMES

pytestmark = pytest.mark.cluster

ADMIN = "admin@cluster.local"
VIEWER = "console-viewer@cluster.local"  # not control/test_update_cert.py's viewer
VIEWER_PASSWORD = "viewer password 1"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
CHROMIUM = "/usr/bin/chromium"


# --- browser and cluster fixtures ------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Playwright's own browser download is unreachable: Debian's chromium, always.
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield launched
    launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1440, "height": 900})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture(scope="module")
def viewer(cluster: DemoCluster) -> str:
    """A cluster_viewer user on the shared cluster (created once)."""
    with api(cluster) as client:
        answer = client.post(
            "/v1/users",
            json={"email": VIEWER, "password": VIEWER_PASSWORD, "role": "cluster_viewer"},
        )
    assert answer.status_code in (200, 409), answer.text  # 409: made by an earlier run
    return VIEWER


@pytest.fixture(scope="module")
def paused_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    """A 3-node cluster of its own whose rollouts pause once the first node has staged, until
    the test deletes the marker file (the TEST-ONLY fault seam, docs/reliability.md), so the
    live per-node view can be seen mid-rollout. Agent calls time out after 5 s."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CLUSTERCERT_FAULT", "pause:during_stage")
        running = start_cluster(tmp_path_factory, 3, "--agent-timeout", "5")
    yield running
    thaw(running)
    running.stop()


# --- helpers ---------------------------------------------------------------------------------


def login(
    page: Page, cluster: DemoCluster, email: str = ADMIN, password: str = ADMIN_PASSWORD
) -> None:
    page.goto(f"{cluster.console_url}/login")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{cluster.console_url}/")


def pem_file(name: str, text: str) -> dict[str, Any]:
    return {"name": name, "mimeType": "application/x-pem-file", "buffer": text.encode()}


def choose(page: Page, certificate: str, key: str | None) -> None:
    page.get_by_label("Certificate file").set_input_files(pem_file("cert.pem", certificate))
    if key is not None:
        page.get_by_label("Key file").set_input_files(pem_file("key.pem", key))


def result_status(page: Page) -> int:
    """Wait for the result section of an action; return the status it shows."""
    result = page.locator("#result .result")
    result.wait_for()
    return int(result.get_attribute("data-status") or 0)


def proxy_leaf(cn: str = "redis.example") -> Leaf:
    return CA.new().issue(cn, sans=[cn, "localhost", "127.0.0.1"], eku=["serverAuth"])


@contextmanager
def nothing_changes(cluster: DemoCluster) -> Iterator[None]:
    """Every node serves what it served (handshakes), and the store desires what it did."""
    served, desired = served_by_node(cluster), desired_fingerprints(cluster)
    yield
    assert served_by_node(cluster) == served
    assert desired_fingerprints(cluster) == desired


def csrf_token(page: Page) -> str:
    return page.locator("input[name=csrf_token]").first.get_attribute("value") or ""


def badge_states(page: Page, name: str) -> dict[str, str]:
    badges = page.locator(f'tr[data-name="{name}"] li.badge')
    return {
        badges.nth(i).get_attribute("data-node") or "": badges.nth(i).get_attribute("data-state")
        or ""
        for i in range(badges.count())
    }


# --- login -----------------------------------------------------------------------------------


def test_login_rejects_a_wrong_password_then_logs_in_and_out(
    cluster: DemoCluster, page: Page
) -> None:
    page.goto(f"{cluster.console_url}/")
    assert page.url == f"{cluster.console_url}/login"  # every page needs a session
    page.get_by_label("E-mail").fill(ADMIN)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    assert page.locator("#login-error").inner_text() == "wrong username or password"
    assert page.context.cookies() == []

    login(page, cluster)
    cookie = next(c for c in page.context.cookies() if c["name"].startswith("__Host-"))
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert 0 < cookie["expires"] - time.time() <= 8 * 3600 + 5
    assert page.locator("#who").inner_text() == f"{ADMIN} (admin)"

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{cluster.console_url}/login")
    page.goto(f"{cluster.console_url}/nodes")
    assert page.url == f"{cluster.console_url}/login"  # the session is gone on the server too
    # The old cookie replayed (e.g. stolen before logout) opens nothing either.
    page.context.add_cookies([{**cookie}])  # type: ignore[list-item]
    page.goto(f"{cluster.console_url}/")
    assert page.url == f"{cluster.console_url}/login"


def test_every_response_carries_the_security_headers(cluster: DemoCluster, page: Page) -> None:
    login(page, cluster)
    request = page.context.request
    for path in ("/login", "/", "/certificates/cm", "/static/console.js", "/static/console.css",
                 "/no-such-page"):  # fmt: skip
        headers = request.get(f"{cluster.console_url}{path}").headers
        assert headers["content-security-policy"] == (
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
            "form-action 'self'"
        ), path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
    # Nothing inline for the policy to block: every script and style comes from /static.
    for path in ("/login", "/", "/certificates/cm", "/nodes", "/history"):
        html = request.get(f"{cluster.console_url}{path}").text()
        assert "<style" not in html and " style=" not in html, path
        assert html.count("<script") == html.count('<script src="/static/console.js"'), path
        assert re.search(r"<[^>]*\son[a-z]+=", html) is None, path  # no inline handlers


# --- the certificates table ------------------------------------------------------------------


def test_the_table_shows_every_name_with_each_nodes_state(cluster: DemoCluster, page: Page) -> None:
    login(page, cluster)
    rows = page.locator("#certificates tbody tr")
    assert [rows.nth(i).get_attribute("data-name") for i in range(rows.count())] == list(NAMES)
    with api(cluster) as client:
        listed = client.get("/v1/cluster/certificates").json()
        set_names = [k[: -len("_cert")] for k in listed if k.endswith("_cert")]
        for name in NAMES:
            row = page.locator(f'tr[data-name="{name}"]')
            if name not in set_names:
                assert row.get_attribute("class") == "unset"
                assert row.locator("td").nth(1).inner_text() == "not set"
                continue
            state = client.get(f"/v1/cluster/certificates/{name}").json()
            assert row.locator("td.generation").inner_text() == str(state["generation"])
            assert row.locator("td.source").inner_text() == state["source"]
            assert row.locator("td.subject").inner_text() == state["subject"]
            expected = {n["name"]: "in-sync" if n["in_sync"] else "lagging" for n in state["nodes"]}
            assert badge_states(page, name) == expected
            assert "days" in row.locator("td.expires").inner_text()
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.get_by_role("link", name="Nodes").click()
    assert page.locator("#nodes tbody tr").count() == len(cluster.nodes)
    assert page.locator('#nodes tbody tr td span.badge[data-state="in-sync"]').count() == len(
        cluster.nodes
    )
    page.get_by_role("link", name="History").click()
    assert page.locator("table.events tbody tr").count() >= 1
    assert "page 1 of" in page.locator("nav.pages").inner_text()


# --- replace by upload, live, on a cluster of its own ----------------------------------------


def _get(page: Page, cluster: DemoCluster, path: str) -> str:
    answer = page.context.request.get(f"{cluster.console_url}{path}")
    assert answer.status == 200
    return answer.text()


def _paused(cluster: DemoCluster) -> Path:
    marker = cluster.cluster.run_dir / "fault-paused-during_stage"
    wait_until(marker.exists, timeout=60, what="the rollout to pause after staging")
    return marker


def _live_steps(page: Page) -> dict[str, str]:
    items = page.locator("#progress-nodes li")
    return {
        items.nth(i).get_attribute("data-node") or "": items.nth(i).get_attribute("data-step") or ""
        for i in range(items.count())
    }


def test_replace_proxy_by_upload_shows_each_nodes_step_and_reaches_every_node(
    paused_cluster: DemoCluster, page: Page
) -> None:
    cluster = paused_cluster
    leaf = proxy_leaf()
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    choose(page, leaf.full_chain_pem, leaf.key_pem)
    page.get_by_role("button", name="Replace", exact=True).click()

    marker = _paused(cluster)
    # Paused mid-rollout: the page shows every node's step, polled live.
    names = {n.name for n in cluster.nodes}
    wait_until(
        lambda: _live_steps(page) == dict.fromkeys(names, "staged"),
        timeout=30,
        what="every node shown as staged",
    )
    assert set(served_by_node(cluster).values()) != {leaf.fingerprint}  # nothing switched yet
    marker.unlink()

    assert result_status(page) == 200
    assert "Replaced on every node" in page.locator("#result h3").inner_text()
    outcomes = page.locator("#result table.outcomes tbody tr")
    assert outcomes.count() == len(cluster.nodes)
    for i in range(outcomes.count()):
        assert outcomes.nth(i).get_attribute("data-ok") == "true"
        assert leaf.fingerprint in outcomes.nth(i).inner_text()
    assert page.locator("#progress").is_hidden()
    # The proof: a TLS handshake to every node's redis.
    assert served_by_node(cluster) == dict.fromkeys(names, leaf.fingerprint)
    # The page's own sections followed: new generation, every node in sync, an event.
    assert page.locator("#overview dd.subject").inner_text() == "CN=redis.example"
    assert page.locator('#overview li.badge[data-state="in-sync"]').count() == len(names)
    assert page.locator("#history table.events tbody tr").first.inner_text().count(ADMIN) == 1
    # No page holds a private key, the one just uploaded included.
    key_lines = [line for line in leaf.key_pem.splitlines() if "-----" not in line]
    for path in ("/", "/certificates/proxy", "/nodes", "/history"):
        html = page.content() if path == "/certificates/proxy" else _get(page, cluster, path)
        assert "PRIVATE KEY" not in html
        assert not any(line in html for line in key_lines)


def test_a_node_that_misses_the_commit_gets_a_409_and_lags_until_it_catches_up(
    paused_cluster: DemoCluster, page: Page
) -> None:
    cluster = paused_cluster
    leaf = proxy_leaf("lagging.example")
    frozen = cluster.nodes[2]
    assert frozen.process is not None
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    choose(page, leaf.full_chain_pem, leaf.key_pem)
    page.get_by_role("button", name="Replace", exact=True).click()
    marker = _paused(cluster)
    wait_until(
        lambda: len(_live_steps(page)) == 3 and set(_live_steps(page).values()) == {"staged"}
    )
    os.kill(frozen.process.pid, signal.SIGSTOP)  # staged everywhere; node-3 misses the commit
    try:
        marker.unlink()
        assert result_status(page) == 409
        assert page.locator("#result code.error-code").inner_text() == "nodes_not_updated"
        failed = page.locator('#result tr[data-ok="false"]')
        assert failed.count() == 1 and failed.get_attribute("data-node") == frozen.name
        page.goto(f"{cluster.console_url}/")
        states = badge_states(page, "proxy")
        assert states.pop(frozen.name) == "lagging"
        assert set(states.values()) == {"in-sync"}
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)

    def caught_up() -> bool:
        page.reload()
        return set(badge_states(page, "proxy").values()) == {"in-sync"}

    wait_until(caught_up, timeout=60, interval=0.5, what="the reconciler to bring node-3 along")
    assert served_fingerprint("127.0.0.1", frozen.redis_port) == leaf.fingerprint


# --- rejected uploads ------------------------------------------------------------------------


def test_a_validation_error_is_shown_in_place_and_nothing_changes(
    cluster: DemoCluster, page: Page
) -> None:
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    leaf, other = proxy_leaf(), proxy_leaf()
    with nothing_changes(cluster):
        choose(page, leaf.full_chain_pem, other.key_pem)
        page.get_by_role("button", name="Validate").click()
        assert result_status(page) == 400
        assert page.locator("#result code.error-code").inner_text() == "key_values_mismatch"
        assert "does not match" in page.locator("#result p.description").inner_text()
        assert "dry run" in page.locator("#result h3").inner_text()

        page.get_by_role("button", name="Replace", exact=True).click()
        page.locator("#result .result[data-status='400']").wait_for()
        assert page.locator("#result code.error-code").inner_text() == "key_values_mismatch"

        # A good pair, validated only: shown as valid, with its warnings, and still nothing sent.
        soon = CA.new().issue(
            "soon.example",
            sans=["soon.example"],
            eku=["serverAuth"],
            not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10),
        )
        choose(page, soon.full_chain_pem, soon.key_pem)
        page.get_by_role("button", name="Validate").click()
        page.locator("#result .result.ok").wait_for()
        assert "Valid: nothing was changed" in page.locator("#result h3").inner_text()
        assert "expires" in page.locator("#result ul.warnings").inner_text()


def test_a_viewer_has_no_replace_controls_and_a_forged_post_is_refused(
    cluster: DemoCluster, viewer: str, page: Page
) -> None:
    login(page, cluster, viewer, VIEWER_PASSWORD)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    assert page.locator("#overview").is_visible()
    assert page.get_by_role("button", name="Replace").count() == 0
    assert page.get_by_role("button", name="Validate").count() == 0
    assert page.get_by_label("Certificate file").count() == 0
    assert page.locator("input[type=file]").count() == 0

    leaf = proxy_leaf()
    forged = {
        "csrf_token": csrf_token(page),  # the viewer's own, valid token
        "certificate": pem_file("c.pem", leaf.full_chain_pem),
        "key": pem_file("k.pem", leaf.key_pem),
    }
    with nothing_changes(cluster):
        for action in ("replace", "validate"):
            answer = page.context.request.post(
                f"{cluster.console_url}/certificates/proxy/{action}", multipart=forged
            )
            assert answer.status == 403
            assert "insufficient_permissions" in answer.text()
            assert "lacks the permission update_cluster" in answer.text()


def test_a_deleted_users_session_opens_nothing(cluster: DemoCluster, page: Page) -> None:
    email = "leaving@cluster.local"
    with api(cluster) as client:
        created = client.post(
            "/v1/users", json={"email": email, "password": VIEWER_PASSWORD, "role": "db_viewer"}
        )
        assert created.status_code == 200, created.text
        login(page, cluster, email, VIEWER_PASSWORD)
        assert client.delete(f"/v1/users/{created.json()['uid']}").status_code == 200
    page.goto(f"{cluster.console_url}/nodes")
    assert page.url == f"{cluster.console_url}/login"  # and no redirect loop back to "/"
    assert page.get_by_role("button", name="Log in").is_visible()


def test_posts_without_the_sessions_token_or_from_elsewhere_are_refused(
    cluster: DemoCluster, page: Page
) -> None:
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    leaf = proxy_leaf()
    files = {
        "certificate": pem_file("c.pem", leaf.full_chain_pem),
        "key": pem_file("k.pem", leaf.key_pem),
    }
    url = f"{cluster.console_url}/certificates/proxy/replace"
    request = page.context.request
    with nothing_changes(cluster):
        for form in (files, {**files, "csrf_token": "a guess"}):
            answer = request.post(url, multipart=form)
            assert answer.status == 403 and "csrf_token_invalid" in answer.text()
        answer = request.post(
            url,
            multipart={**files, "csrf_token": csrf_token(page)},
            headers={"Origin": "https://evil.example"},
        )
        assert answer.status == 403 and "may not act on this console" in answer.text()
        # The API's limits: 1 MiB of body, 16 PEM blocks per file.
        big = {
            **files,
            "csrf_token": csrf_token(page),
            "certificate": pem_file("c.pem", "x" * (1 << 20)),
        }
        answer = request.post(url, multipart=big)
        assert answer.status == 413 and "payload_too_large" in answer.text()
        many = {
            **files,
            "csrf_token": csrf_token(page),
            "certificate": pem_file("c.pem", leaf.full_chain_pem * 9),
        }
        answer = request.post(url, multipart=many)
        assert answer.status == 400 and "at most 16 are accepted" in answer.text()
        # No session at all.
        request.post(f"{cluster.console_url}/logout", multipart={"csrf_token": csrf_token(page)})
        answer = request.post(url, multipart={**files, "csrf_token": csrf_token(page)})
        assert answer.status == 401 and "log in again" in answer.text()


# --- hostile text ----------------------------------------------------------------------------


def test_a_subject_with_markup_renders_as_text(cluster: DemoCluster, page: Page) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    leaf = self_signed(hostile, sans=["redis.example", "localhost"], eku=["serverAuth"])
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/proxy")
    choose(page, leaf.cert_pem, leaf.key_pem)
    page.get_by_role("button", name="Replace", exact=True).click()
    assert result_status(page) == 200, page.locator("#result").inner_text()
    assert set(served_by_node(cluster).values()) == {leaf.fingerprint}

    for path, shown in (("/certificates/proxy", "#overview dd.subject"),
                        ("/", 'tr[data-name="proxy"] td.subject')):  # fmt: skip
        page.goto(f"{cluster.console_url}{path}")
        assert page.locator("img").count() == 0
        assert "<img src=x onerror=alert(1)" in page.locator(shown).inner_text().replace("\\", "")
        assert "&lt;img src=x onerror=alert(1)" in page.content().replace("\\", "")
    assert dialogs == []


# --- replacing cm under an open page ---------------------------------------------------------


def test_replacing_cm_keeps_an_open_page_working_and_new_handshakes_see_it(
    cluster: DemoCluster, page: Page
) -> None:
    port = cluster.console_port
    assert port is not None
    before = served_fingerprint("127.0.0.1", port)
    assert before == desired_fingerprints(cluster)["cm"]
    login(page, cluster)
    page.goto(f"{cluster.console_url}/certificates/cm")

    leaf = CA.new().issue(
        "console.example", sans=["console.example", "localhost", "127.0.0.1"], eku=["serverAuth"]
    )
    choose(page, leaf.full_chain_pem, leaf.key_pem)
    page.get_by_role("button", name="Replace", exact=True).click()
    assert result_status(page) == 200  # the answer came back over the connection already open
    assert served_fingerprint("127.0.0.1", port) == leaf.fingerprint
    assert served_fingerprint("127.0.0.1", port, "localhost") == leaf.fingerprint

    # The open page goes on: the live-progress endpoint, navigation, the session.
    assert page.evaluate("fetch('/rollout').then(r => r.status)") == 200
    page.get_by_role("link", name="Certificates").click()
    assert page.locator('tr[data-name="cm"] td.subject').inner_text() == "CN=console.example"
    assert page.locator("#who").is_visible()


# --- the server's console options ------------------------------------------------------------


def _server(
    directory: Path, api_port: int, console_port: int, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "clustercert", "server", "--dir", str(directory),
         "--listen", f"127.0.0.1:{api_port}", "--console-listen", f"127.0.0.1:{console_port}",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_no_console_serves_none_and_a_taken_console_port_stops_the_server(tmp_path: Path) -> None:
    init_cluster(
        tmp_path, name="cluster.local", admin_email=ADMIN, admin_password=ADMIN_PASSWORD,
        now=utc_now(),
    )  # fmt: skip
    api_port, console_port = free_port(), free_port()
    process = _server(tmp_path, api_port, console_port, "--no-console")
    try:
        wait_until(lambda: accepts(api_port), timeout=60, what="the API to listen")
        assert not accepts(console_port)
    finally:
        process.terminate()
        process.communicate(timeout=30)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", console_port))
        taken.listen()
        process = _server(tmp_path, free_port(), console_port)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == ConfigError.exit_code
    assert f"the web console cannot listen on 127.0.0.1:{console_port}" in output
    assert "Traceback" not in output
