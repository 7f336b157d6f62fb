"""The research dashboard against the real Serve app: Debian chromium driven by playwright.

A tiny model is trained for a few steps first (a real ``fit`` run writing ``metrics.jsonl`` under a
temporary runs root); the app serves that checkpoint with ``runs_root`` pointing at the same root.
Every view is opened, shown real data from the server, and screenshotted into
``runs/ui-screenshots/`` (git-ignored; ``DNC_UI_SCREENSHOTS`` overrides). The page must log no
console errors, except the 4xx responses of the validation tests.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from decimal import ROUND_HALF_UP, Decimal

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.ray]

# the other Serve modules' port by default (conftest.SERVE_PORT): one Serve instance serves them all
PORT = int(os.environ.get("DNC_UI_TEST_PORT") or os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
BASE = f"http://127.0.0.1:{PORT}"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = os.environ.get("DNC_UI_SCREENSHOTS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "ui-screenshots")
VIEWS = ["overview", "training", "inspector", "attention", "efficiency", "probe", "comparison", "flow"]


def _training():
    try:  # after the dnc/training split
        from dnc.training import TrainConfig, fit
    except ImportError:
        from dnc.training import TrainConfig, fit
    return TrainConfig, fit


def tiny_train_config(steps: int, log_interval: int = 2, eval_interval: int = 6):
    TrainConfig, _ = _training()
    return TrainConfig(max_steps=steps, total_steps=steps, batch_size=4, max_len=128, log_interval=log_interval,
                       eval_interval=eval_interval, eval_samples=4, checkpoint_interval=steps, bf16=False, warmup_steps=2)


def _wait_http(url: str, timeout: float = 300.0) -> None:  # generous: a shared 2-core machine
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:  # not listening yet
            last = repr(e)
        time.sleep(0.25)  # a poll is one local GET: the app is used ~0.4 s sooner on average than at 1 s
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-runs")


@pytest.fixture(scope="module")
def trained_checkpoint(runs_root):
    """A real tiny run of 12 steps: its metrics.jsonl is a run the monitor lists, its checkpoint is served."""
    import torch

    _, fit = _training()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(tiny_train_config(12), run_dir=str(runs_root / "tiny-trained"), device="cpu", progress=False, resume=False)
    finally:
        torch.set_num_threads(threads)
    ckpts = sorted((runs_root / "tiny-trained" / "checkpoints").iterdir())
    assert ckpts, "the training run wrote no checkpoint"
    return str(ckpts[-1])


@pytest.fixture(scope="module")
def server(request, runs_root, trained_checkpoint):
    """The real Serve app on PORT serving the trained checkpoint; shut down after the module.

    DNC_UI_TEST_URL=http://host:port runs the tests against an already running server instead (its
    runs root must then be DNC_UI_TEST_RUNS_ROOT for the training-monitor test).
    """
    if os.environ.get("DNC_UI_TEST_URL"):
        url = os.environ["DNC_UI_TEST_URL"].rstrip("/")
        _wait_http(f"{url}/health", timeout=30)
        yield url
        return
    build_app = pytest.importorskip("serve.app").build_app
    request.getfixturevalue("ray_cluster")
    from ray import serve

    from conftest import remove_app, serve_on

    storage = request.getfixturevalue("tmp_path_factory").mktemp("ui-serve-storage")
    serve_on(PORT)  # kept from the previous Serve module when it listens on PORT
    args = {"storage": str(storage), "bank_shards": 1, "namespace": "bwr-dnc-ui-test", "torch_threads": 1,
            "live_interval_s": 1.0, "checkpoint": trained_checkpoint, "runs_root": str(runs_root)}
    try:
        serve.run(build_app(args), name="dnc-ui-test", route_prefix="/", blocking=False)
        _wait_http(f"{BASE}/health")
        yield BASE
    finally:
        remove_app(args, "dnc-ui-test")  # the app and its detached actors (Serve: conftest)


@pytest.fixture(scope="module")
def live_runs_root(runs_root):
    return os.environ.get("DNC_UI_TEST_RUNS_ROOT") or str(runs_root)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: run `make browser-deps` (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Console:
    """Console errors and page errors of one page. ``allow_4xx`` admits the browser's own
    "Failed to load resource: ... status of 4xx" lines, which a validation test causes on purpose."""

    def __init__(self):
        self.errors: list[str] = []
        self.allow_4xx = False

    def unexpected(self) -> list[str]:
        ok = re.compile(r"status of 4\d\d") if self.allow_4xx else None
        return [e for e in self.errors if not (ok and ok.search(e))]


@pytest.fixture
def console():
    return Console()


@pytest.fixture
def page(server, browser, console):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    pg.on("pageerror", lambda e: console.errors.append(f"pageerror: {e.message}\n{e.stack}"))
    # the URL says which request failed ("Failed to load resource" alone does not)
    pg.on("console", lambda m: console.errors.append(f"console.{m.type}: {m.text} ({m.location.get('url')})")
          if m.type == "error" else None)
    pg.goto(f"{server}/ui/#overview")
    yield pg
    ctx.close()
    assert not console.unexpected(), f"console errors on the page: {console.unexpected()}"


def open_view(page, name: str) -> None:
    from playwright.sync_api import expect

    page.click(f"#tab-{name}")
    expect(page.locator(f"#view-{name}")).to_be_visible()


def screenshot(page, name: str) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def make_session(server, sid: str, owner: str | None = None, tokens: int = 24) -> dict:
    headers = {"X-Owner": owner} if owner else {}
    r = httpx.post(f"{server}/v1/generate", headers=headers, timeout=120,
                   json={"prompt": "The blue key is in the red box. The coin is in the green box. " * 3,
                         "max_new_tokens": tokens, "state_id": sid, "seed": 5, "temperature": 1.5})
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- tests
def test_ui_and_vendored_chart_library_are_served_locally(server):
    r = httpx.get(f"{server}/ui/", timeout=10)
    assert r.status_code == 200 and "BWR-DNC" in r.text
    assets = ["style.css", "js/main.js", "js/api.js", "js/charts.js", "js/util.js",
              "vendor/uplot-1.6.32/uPlot.esm.js", "vendor/uplot-1.6.32/uPlot.min.css", "vendor/uplot-1.6.32/LICENSE"]
    assets += [f"js/views/{v}.js" for v in ("overview", "training", "inspector", "attention", "efficiency", "probe",
                                            "comparison", "flow")]
    for asset in assets:
        got = httpx.get(f"{server}/ui/{asset}", timeout=10)
        assert got.status_code == 200, asset
        if asset.endswith((".js", ".html", ".css")) and "vendor/" not in asset:
            assert not re.search(r"""(src|href|import)[^\n]*["']https?://""", got.text), f"{asset} loads from a CDN"
    assert "MIT" in httpx.get(f"{server}/ui/vendor/uplot-1.6.32/LICENSE", timeout=10).text


def test_overview_shows_model_health_sessions_and_serving(page, server):
    from playwright.sync_api import expect

    expect(page.get_by_test_id("health-status")).to_have_text("ok", timeout=30_000)
    expect(page.get_by_test_id("ws-status")).to_have_text("live", timeout=30_000)
    page.wait_for_timeout(1500)  # a first `metrics` tick, so the generation below shows as throughput
    make_session(server, f"ov-{int(time.time())}", tokens=64)
    page.click("#health-refresh")
    page.evaluate("location.hash = '#inspector'")  # visiting the overview again reloads its figures
    page.evaluate("location.hash = '#overview'")
    expect(page.get_by_test_id("model-summary")).to_contain_text("params", timeout=30_000)
    expect(page.get_by_test_id("ov-model")).to_contain_text("checkpoints/step_", timeout=30_000)
    expect(page.get_by_test_id("ov-health")).to_contain_text("forward pass")
    expect(page.locator("#ov-sessions tr").first).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("ov-serving")).to_contain_text("requests")
    # the live `metrics` ticks (every second here) draw the server's throughput over time
    expect(page.get_by_test_id("ov-tps-chart")).to_have_attribute("data-points", re.compile(r"^[2-9]|\d\d"), timeout=30_000)
    # "1 requests" / "1 tokens" are gone: counts agree with their nouns
    assert not re.search(r"\b1 (requests|tokens|turns)\b", page.get_by_test_id("live-serving").text_content())
    screenshot(page, "overview")


def test_training_monitor_follows_a_run_while_it_trains(page, live_runs_root):
    """A real training run started after the page opened: the monitor switches to it and its step
    count grows on screen while the trainer is still writing."""
    from playwright.sync_api import expect

    import torch

    _, fit = _training()
    open_view(page, "training")
    expect(page.locator("#run-select option").first).to_be_attached(timeout=30_000)  # the trained run
    name = f"live-{int(time.time())}"
    errors: list[BaseException] = []

    def train():
        torch.set_num_threads(1)
        try:
            # ~20 s on one thread: the page must see several steps while it trains (100 steps took
            # ~6 s once evaluations became one forward per sample, and the page saw one step)
            fit(tiny_train_config(300, log_interval=4, eval_interval=48), run_dir=os.path.join(live_runs_root, name),
                device="cpu", progress=False, resume=False)
        except BaseException as e:  # reported by the test
            errors.append(e)

    th = threading.Thread(target=train, daemon=True)
    th.start()
    seen: list[int] = []
    summary = page.get_by_test_id("run-summary")
    deadline = time.monotonic() + 150
    while th.is_alive() and time.monotonic() < deadline:
        if page.locator("#run-select").input_value() == f"file:{name}":
            step = summary.get_attribute("data-step")
            if step and (not seen or int(step) != seen[-1]):
                seen.append(int(step))
        time.sleep(0.3)
    th.join(timeout=120)
    assert not errors, errors
    assert len(set(seen)) >= 2 and seen == sorted(seen), f"steps seen while training: {seen}"
    # finished: the last row of the file is on screen, with loss, memory and accuracy charts
    last = json.loads(open(os.path.join(live_runs_root, name, "metrics.jsonl")).read().strip().splitlines()[-1])
    expect(summary).to_have_attribute("data-step", str(last["step"]), timeout=30_000)
    for panel in ("loss", "lr", "acc", "stage", "slots", "memq", "memops"):
        chart = page.locator(f'[data-testid="train-panel-{panel}"] .uchart')
        expect(chart).to_have_attribute("data-points", re.compile(r"^\d+$"), timeout=10_000)
        assert int(chart.get_attribute("data-points")) >= 2, panel
    expect(page.get_by_test_id("stage-strip")).to_contain_text("foundation")
    screenshot(page, "training")


def test_a_single_pushed_step_draws_a_point(page, server):
    """A trainer's POST /research/training-step arrives on /ws/live. One step used to draw an
    empty chart (axes 99.5-100.5, no point): now it is a point inside a padded x range."""
    from playwright.sync_api import expect

    run = f"push-{int(time.time())}"
    open_view(page, "training")
    expect(page.get_by_test_id("ws-status")).to_have_text("live", timeout=30_000)
    r = httpx.post(f"{server}/research/training-step", json={"run_id": run, "step": 100, "loss": 3.25}, timeout=30)
    assert r.status_code == 200, r.text
    option = page.locator(f'#run-select option[value="push:{run}"]')
    expect(option).to_have_count(1, timeout=30_000)
    page.select_option("#run-select", f"push:{run}")
    chart = page.locator('[data-testid="train-panel-loss"] .uchart')
    expect(chart).to_have_attribute("data-points", "1", timeout=30_000)
    assert float(chart.get_attribute("data-xmin")) < 100 < float(chart.get_attribute("data-xmax"))
    assert chart.locator("canvas").count() == 1
    for step, loss in [(110, 3.0), (120, 2.8), (130, 2.7)]:
        httpx.post(f"{server}/research/training-step", json={"run_id": run, "step": step, "loss": loss}, timeout=30)
    expect(chart).to_have_attribute("data-points", "4", timeout=30_000)
    expect(page.get_by_test_id("run-summary")).to_contain_text("step 130")
    expect(page.get_by_test_id("live-log")).to_contain_text(f"{run} step 130 loss 2.7")


def test_probe_streams_an_answer_and_shows_the_slots_each_token_read(page):
    from playwright.sync_api import expect

    sid = f"probe-{int(time.time())}"
    open_view(page, "probe")
    # Record the output's length each time it changes while the request is still open: streamed
    # text is on screen before the reply completes.
    page.evaluate("""() => {
        window.__partial = [];
        const out = document.getElementById('gen-output'), meta = document.getElementById('gen-meta');
        new MutationObserver(() => {
            if (meta.textContent.startsWith('streaming')) window.__partial.push(out.textContent.length);
        }).observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#prompt", "The key is in the blue box. Where is the key?")
    page.fill("#max-new-tokens", "64")
    # Seeded: the briefly trained model often samples its end-of-text token within a few tokens;
    # seed 5 at temperature 1.5 samples all 64 (the trained checkpoint is deterministic on CPU).
    page.fill("#temperature", "1.5")
    page.fill("#seed", "5")
    page.fill("#state-id", sid)
    page.click("#generate-btn")
    expect(page.get_by_test_id("gen-meta")).to_contain_text(re.compile(r"\d+ tokens? in"), timeout=120_000)
    expect(page.get_by_test_id("gen-error")).to_be_hidden()
    answer = page.locator('[data-testid="turn-model"]').text_content()
    assert answer and not answer.startswith("(no text"), "no answer text"
    assert [n for n in page.evaluate("window.__partial") if n > 0], "no text was shown before the stream completed"
    expect(page.locator('[data-testid="turn-model"]')).to_have_count(1)
    # each generated token, hovered, names the memory slots it read
    toks = page.locator("#probe-reads-box .probe-tok")
    expect(toks.first).to_be_visible(timeout=60_000)
    toks.nth(toks.count() - 1).hover()
    expect(page.get_by_test_id("probe-token-reads")).to_contain_text(re.compile(r"layer \d+: (L\d#\d+|no slots)"))
    screenshot(page, "probe")
    # the session it wrote is now the inspector's selection
    open_view(page, "inspector")
    expect(page.locator(f'tr[data-state-id="{sid}"]')).to_have_attribute("aria-selected", "true", timeout=30_000)


def test_inspector_never_shows_a_stale_bank(page, server):
    """Cluster scatter and memory views follow the session: compact redraws them from the new bank,
    delete (after a confirmation) and an owner switch clear them."""
    from playwright.sync_api import expect

    sid = f"insp-{int(time.time())}"
    make_session(server, sid, tokens=24)
    open_view(page, "inspector")
    row = page.locator(f'tr[data-state-id="{sid}"]')
    expect(row).to_be_visible(timeout=30_000)
    row.click()
    expect(page.get_by_test_id("state-detail-id")).to_have_text(sid)
    bars = page.locator("#memory-bars .bar-row")
    expect(bars).to_have_count(3, timeout=30_000)
    expect(page.get_by_test_id("memory-facts")).to_contain_text("1 turn ")  # not "1 turns"
    expect(page.locator('[data-testid="slot-card"]').first).to_be_visible()
    expect_slot_cards(page, server, sid)

    page.click("#cluster-btn")
    msg = page.get_by_test_id("cluster-msg")
    expect(msg).to_contain_text(f"· {sid}", timeout=60_000)
    before = int(re.match(r"(\d+) slots", msg.text_content()).group(1))
    assert page.locator("#cluster-plot circle").count() == before
    screenshot(page, "inspector")

    # Another client writes to this session: the live event redraws the memory and the scatter.
    make_session(server, sid, tokens=8)
    expect(page.get_by_test_id("memory-facts")).to_contain_text("2 turns", timeout=30_000)
    grown = httpx.post(f"{server}/research/state-clustering", json={"state_id": sid, "k": 4}, timeout=60).json()["n_points"]
    expect(msg).to_have_text(re.compile(rf"^{grown} slots? · .* · {sid}$"), timeout=60_000)
    before = grown

    # Compact: the scatter is redrawn from the compacted bank (what the server now clusters).
    page.click("#compact-btn")
    expect(page.get_by_test_id("state-action-msg")).to_contain_text(f"compacted {sid}", timeout=60_000)
    after = httpx.post(f"{server}/research/state-clustering", json={"state_id": sid, "k": 4}, timeout=60).json()["n_points"]
    expect(msg).to_have_text(re.compile(rf"^{after} slots? · .* · {sid}$"), timeout=60_000)
    assert page.locator("#cluster-plot circle").count() == after
    assert after != before, "compaction should change the bank this test clusters"
    expect_slot_cards(page, server, sid)  # the cards show the compacted bank too

    # Delete asks first; cancelling keeps the session.
    page.click("#delete-btn")
    expect(page.locator("#delete-confirm")).to_be_visible()
    expect(page.locator("#delete-q")).to_contain_text(sid)
    page.click("#delete-no")
    expect(page.locator("#delete-confirm")).to_be_hidden()
    assert httpx.get(f"{server}/v1/state/{sid}", timeout=30).status_code == 200
    page.click("#delete-btn")
    page.click("#delete-yes")
    expect(page.get_by_test_id("state-action-msg")).to_have_text(f"deleted session {sid}", timeout=30_000)
    expect(row).to_have_count(0, timeout=30_000)
    assert httpx.get(f"{server}/v1/state/{sid}", timeout=30).status_code == 404
    assert page.locator("#cluster-plot circle").count() == 0
    assert sid not in page.get_by_test_id("cluster-msg").text_content()
    expect(page.locator("#state-detail-box")).to_be_hidden()  # no other session is picked in its place
    assert page.get_by_test_id("slot-item").count() == 0 and page.get_by_test_id("slots-msg").text_content() == ""


def _to_fixed(v: float, digits: int) -> str:
    """JavaScript's ``v.toFixed(digits)``: the exact binary value rounded half up (3.25 -> "3.3"),
    where Python's format rounds half to even ("3.2")."""
    return str(Decimal(v).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _count_text(v: float) -> str:
    """How the inspector writes a count (age, access): whole numbers as such, else one decimal."""
    return f"{int(v):,}" if float(v).is_integer() else _to_fixed(v, 1)


def expect_slot_cards(page, server, sid: str) -> None:
    """The slot cards of ``sid`` are the server's /research/slots answer: per level the most salient
    slots in order with their numbers, and the count of the slots not shown."""
    from playwright.sync_api import expect

    per_level = int(page.locator("#slots-per-level").input_value())
    want = httpx.post(f"{server}/research/slots", json={"state_id": sid, "per_level": per_level}, timeout=60).json()
    assert want["total_slots"] > 0, want
    expect(page.get_by_test_id("slots-msg")).to_contain_text(f"{want['total_slots']} slot", timeout=60_000)
    for level in want["levels"]:
        sec = page.locator(f'[data-testid="slot-level"][data-level="{level["level"]}"]')
        expect(sec).to_contain_text(f"{level['valid']} / {level['capacity']} slots")
        items = sec.get_by_test_id("slot-item")
        expect(items).to_have_count(level["shown"])
        more = sec.get_by_test_id("slots-more")
        if level["not_shown"]:
            expect(more).to_have_text(f"{level['not_shown']:,} more not shown")
        else:
            expect(more).to_have_count(0)
        for i, slot in enumerate(level["slots"][:4]):
            card = items.nth(i)
            expect(card).to_have_attribute("data-index", str(slot["index"]))
            expect(card).to_have_attribute("data-layer", str(slot["layer"]))
            expect(card.locator('[data-field="salience"]')).to_have_text(_to_fixed(slot["salience"], 3))
            expect(card.locator('[data-field="age"]')).to_have_text(_count_text(slot["age"]))
            expect(card.locator('[data-field="access"]')).to_have_text(_count_text(slot["access"]))
            if "importance" in slot:
                expect(card.locator('[data-field="importance"]')).to_have_text(_to_fixed(slot["importance"], 3))


def test_inspector_slot_cards_empty_bank_and_bad_page_size(page, server, console):
    """A session with nothing written says its bank is empty; a page size the server refuses shows
    the server's message instead of cards."""
    from playwright.sync_api import expect

    sid = f"empty-{int(time.time())}"
    assert httpx.post(f"{server}/v1/states", json={"state_id": sid}, timeout=30).status_code == 201
    try:
        open_view(page, "inspector")
        row = page.locator(f'tr[data-state-id="{sid}"]')
        page.click("#states-refresh")
        expect(row).to_be_visible(timeout=30_000)
        row.click()
        expect(page.get_by_test_id("slots-msg")).to_have_text(
            "The bank is empty: generate with this session to fill its memory.", timeout=60_000)
        assert page.get_by_test_id("slot-item").count() == 0
        console.allow_4xx = True
        page.fill("#slots-per-level", "1000")
        page.dispatch_event("#slots-per-level", "change")
        expect(page.get_by_test_id("slots-msg")).to_contain_text("per_level", timeout=60_000)
    finally:
        httpx.delete(f"{server}/v1/state/{sid}", timeout=30)


def test_owner_switch_clears_the_other_owners_views(page, server):
    from playwright.sync_api import expect

    sid = f"owned-{int(time.time())}"
    make_session(server, sid, owner="ui-alice", tokens=16)
    open_view(page, "inspector")
    page.fill("#owner", "ui-alice")
    page.dispatch_event("#owner", "change")
    row = page.locator(f'tr[data-state-id="{sid}"]')
    expect(row).to_be_visible(timeout=30_000)
    row.click()
    page.click("#cluster-btn")
    expect(page.locator("#cluster-plot circle").first).to_be_attached(timeout=60_000)
    page.fill("#owner", "ui-bob")
    page.dispatch_event("#owner", "change")
    expect(row).to_have_count(0, timeout=30_000)
    assert page.locator("#cluster-plot circle").count() == 0
    assert page.get_by_test_id("cluster-msg").text_content() == ""
    expect(page.locator("#memory-bars .bar-row")).to_have_count(0)
    page.fill("#owner", "ui-alice")
    page.dispatch_event("#owner", "change")
    expect(row).to_be_visible(timeout=30_000)
    page.evaluate("localStorage.removeItem('dnc-owner')")
    # Clean-up from outside the page: the page watches this session (it re-selects it after a live
    # event, ~0.5 s debounced), and a request of its own after the delete would 404, which the
    # browser logs whatever the page does with it. Leave the page first.
    page.goto("about:blank")
    assert httpx.delete(f"{server}/v1/state/{sid}", headers={"X-Owner": "ui-alice"}, timeout=30).status_code == 200


def test_attention_view_draws_heatmaps_and_token_reads(page, server):
    from playwright.sync_api import expect

    # the loss legend is not shown before any analysis
    assert page.locator("#analyze-scale").is_hidden()
    sid = f"attn-{int(time.time())}"
    make_session(server, sid, tokens=8)
    page.reload()
    open_view(page, "attention")
    expect(page.get_by_test_id("attention-meta")).to_contain_text("tokens", timeout=60_000)
    expect(page.get_by_test_id("local-heatmap")).to_have_attribute("data-rows", re.compile(r"^[1-9]\d*$"))
    expect(page.get_by_test_id("memory-heatmap")).to_have_attribute("data-rows", "3")
    assert int(page.get_by_test_id("memory-heatmap").get_attribute("data-cols")) > 10
    assert page.locator("#head-table tbody tr").count() > 0
    assert page.locator("#analyze-tokens .tok[data-loss]").count() > 0
    expect(page.locator("#analyze-scale")).to_be_visible()
    # analyse on the session's memory: the reads name its slots
    page.select_option("#attention-state", sid)
    page.click("#attention-btn")
    expect(page.get_by_test_id("attention-meta")).to_contain_text(f"on {sid}'s memory", timeout=60_000)
    page.locator("#analyze-tokens .tok").nth(5).hover()
    expect(page.get_by_test_id("token-reads")).to_contain_text(re.compile(r"layer \d+: L\d#\d+"))
    screenshot(page, "attention")
    httpx.delete(f"{server}/v1/state/{sid}", timeout=30)


def test_efficiency_view_measures_bank_against_kv_cache(page):
    from playwright.sync_api import expect

    # before the view opens (hidden inputs cannot be typed into): measured once, at these lengths
    page.evaluate("document.getElementById('eff-lengths').value = '64,256'")
    open_view(page, "efficiency")
    expect(page.locator("#eff-table tbody tr")).to_have_count(2, timeout=90_000)
    expect(page.get_by_test_id("eff-bytes-chart")).to_have_attribute("data-points", "2", timeout=30_000)
    expect(page.get_by_test_id("eff-tps-chart")).to_have_attribute("data-points", "2")
    expect(page.get_by_test_id("eff-serving")).not_to_be_empty()
    screenshot(page, "efficiency")


def test_comparison_view_plots_the_benchmark_results(page):
    from playwright.sync_api import expect

    open_view(page, "comparison")
    expect(page.get_by_test_id("cmp-msg")).to_contain_text("result files", timeout=30_000)
    for chart in ("cmp-tps-chart", "cmp-mem-chart", "cmp-acc-chart"):
        expect(page.get_by_test_id(chart)).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"), timeout=30_000)
    expect(page.locator('[data-testid="cmp-tps-chart"] .u-legend')).to_contain_text("baseline")
    assert page.locator("#cmp-serve-table tbody tr").count() > 0
    screenshot(page, "comparison")


def test_flow_view_shows_information_flow_and_decision_explanation(page):
    from playwright.sync_api import expect

    open_view(page, "flow")
    expect(page.get_by_test_id("flow-meta")).to_contain_text("tokens", timeout=90_000)
    expect(page.locator('#flow-bars .bar-row')).not_to_have_count(0)
    expect(page.get_by_test_id("flow-bars")).to_contain_text("memory")
    expect(page.get_by_test_id("explain-head")).to_contain_text("p =")
    assert page.locator("#explain-tokens .tok").count() > 0
    assert page.locator("#explain-preds .bar-row").count() > 0
    screenshot(page, "flow")


@pytest.mark.parametrize("field,value,expect_text", [
    ("#max-new-tokens", "0", "max_new_tokens"),
    ("#state-id", "not a valid id!", "state_id"),
    ("#seed", "-1", "seed"),
])
def test_invalid_input_shows_server_message(page, console, field, value, expect_text):
    from playwright.sync_api import expect

    console.allow_4xx = True
    open_view(page, "probe")
    page.fill("#max-new-tokens", "4")
    page.fill(field, value)
    page.click("#generate-btn")
    err = page.get_by_test_id("gen-error")
    expect(err).to_be_visible(timeout=30_000)
    expect(err).to_contain_text(expect_text)
    assert err.text_content().startswith("4"), "the HTTP 4xx status is shown with the message"


def test_api_key_is_sent_as_bearer_and_on_the_websocket(page, server):
    """With a key in the field: every request carries `Authorization: Bearer KEY`, the live socket's
    first message is the auth message, and the key survives a reload (local storage). Today's server
    on loopback without keys ignores both, so the page keeps working."""
    from playwright.sync_api import expect

    key = "ui-test-key-123"
    frames: list[str] = []
    auth_headers: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: frames.append(str(payload))))
    page.on("request", lambda r: auth_headers.append(r.headers.get("authorization", "")) if "/v1/" in r.url else None)
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#owner")).to_be_disabled()
    open_view(page, "inspector")
    expect(page.get_by_test_id("ws-status")).to_have_text("live", timeout=30_000)
    deadline = time.monotonic() + 10
    while not frames and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert frames and json.loads(frames[0]) == {"type": "auth", "key": key}
    assert f"Bearer {key}" in auth_headers
    page.reload()
    expect(page.locator("#api-key")).to_have_value(key)
    page.fill("#api-key", "")
    page.dispatch_event("#api-key", "change")
    assert page.evaluate("localStorage.getItem('dnc-api-key')") is None
    expect(page.locator("#owner")).to_be_enabled()
