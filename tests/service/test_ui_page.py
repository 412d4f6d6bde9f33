"""The try-it page at `/`, driven in a real Chromium over a real server: it lists the tasks through the API's
paging and search, classifies real photos with `imagenet` as torchvision does, shows the API's own 415, reads
/metrics into per-task rates and quantiles, and is usable by keyboard with every control named.

Needs the `playwright` package and a Chromium (Debian's `chromium`; elsewhere set PIGGYBACK_CHROMIUM to any
Chromium binary). Takes a full-page screenshot after a classification: docs/ui.png when
PIGGYBACK_UPDATE_SCREENSHOT=1 (the README shows it), else in the test's temporary folder, so a test run
never changes the checkout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
import torchvision

from mask_store import BackboneLayout, TaskStore, artifact_bytes, build_backbone, offline_weights
from mask_store.synthetic import random_task_artifact
from tests.service.test_imagenet_task import PHOTOS, torchvision_probabilities
from tests.support.http_guard import SERVICE_URLS
from tests.support.servers import start_service, stop_process
from training.backbone_task import backbone_task
from training.demo import DEMO_ARCH, DEMO_PREPROCESS

CHROMIUM = Path(os.environ.get("PIGGYBACK_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "ui.png"
COLD = [f"task-{i:03d}" for i in range(12)]  # with imagenet, digits and mnist: 15 tasks, two pages of 10
TIMEOUT_MS = 15_000

pytestmark = pytest.mark.slow  # a real server process, ImageNet-size forwards and a browser: 15 to 25 s

if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: apt-get install chromium, or set PIGGYBACK_CHROMIUM",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m service` over the demo store's shape: the ImageNet mobilenet_v2 with `imagenet` and `digits`
    resident, `mnist` and 12 more tasks registered but cold (so the page must describe them itself)."""
    weights = offline_weights(DEMO_ARCH)
    backbone = build_backbone(DEMO_ARCH, weights)
    layout = BackboneLayout.from_model(DEMO_ARCH, backbone)
    store_dir = tmp_path_factory.mktemp("ui") / "store"
    store = TaskStore(store_dir)
    store.put(artifact_bytes(backbone_task(DEMO_ARCH, weights, task="imagenet", version=1)), layout)
    for seed, name in enumerate(["digits", "mnist", *COLD]):
        artifact = random_task_artifact(
            backbone, DEMO_ARCH, task=name, labels=[str(d) for d in range(10)], seed=seed, layout=layout,
            preprocess=DEMO_PREPROCESS,
        )  # fmt: skip
        store.put(artifact_bytes(artifact), layout)
    process, port = start_service(
        store_dir, weights, backbone=DEMO_ARCH, preload="pinned", pinned_tasks="imagenet,digits", store_poll_s="60"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        stop_process(process, grace_s=10)
        SERVICE_URLS.discard(base)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_page_and_assets_are_served_with_a_strict_policy(server, browser):
    context = browser.new_context()
    try:
        for path in ("/", "/ui"):
            answer = context.request.get(server + path)
            assert answer.status == 200, path
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            policy = answer.headers["content-security-policy"]
            assert policy.startswith("default-src 'self';") and "'unsafe-inline'" not in policy
            assert '<script src="ui/app.js"' in answer.text()
        for asset, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
            answer = context.request.get(f"{server}/ui/{asset}")
            assert answer.status == 200 and answer.headers["content-type"].startswith(media_type), asset
        missing = context.request.get(f"{server}/ui/secret.py")
        assert missing.status == 404 and "no page asset" in missing.json()["detail"]
        paths = context.request.get(f"{server}/openapi.json").json()["paths"]
        assert "/" not in paths and not any(path.startswith("/ui") for path in paths)
    finally:
        context.close()


def focused(page) -> dict:
    """What has the keyboard focus: its id, role, task name, and whether its focus ring is drawn."""
    return page.evaluate(
        """() => {
          const el = document.activeElement, style = getComputedStyle(el);
          const outlined = style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
          const ring = el.matches(':focus-visible') && outlined;
          return {id: el.id, role: el.getAttribute('role'), name: el.dataset.name || null, ring};
        }"""
    )


def tab_until(page, wanted, limit: int = 40) -> list[dict]:
    """Press Tab until `wanted(focused)` holds; the stops on the way, the last one included."""
    stops = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        stops.append(focused(page))
        if wanted(stops[-1]):
            return stops
    raise AssertionError(f"Tab never reached the wanted control; stops: {stops}")


def unnamed_controls(page) -> tuple[int, list[str]]:
    """Every visible control's accessible name as Chromium computes it (its accessibility tree, over CDP):
    (how many were checked, the ones without a name)."""
    selector = "input, select, textarea, button, [role=option], [role=listbox]"
    visible = page.evaluate(
        f"() => [...document.querySelectorAll('{selector}')].filter(e => e.checkVisibility()).length"
    )
    cdp = page.context.new_cdp_session(page)
    cdp.send("Accessibility.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    checked, unnamed = 0, []
    for node_id in cdp.send("DOM.querySelectorAll", {"nodeId": root, "selector": selector})["nodeIds"]:
        node = cdp.send("Accessibility.getPartialAXTree", {"nodeId": node_id, "fetchRelatives": False})["nodes"][0]
        if node.get("ignored"):
            continue  # hidden (the webcam's capture button before the webcam runs)
        checked += 1
        if not node.get("name", {}).get("value", "").strip():
            unnamed.append(cdp.send("DOM.getOuterHTML", {"nodeId": node_id})["outerHTML"][:120])
    cdp.detach()
    assert checked == visible, f"{visible} visible controls, {checked} in the accessibility tree"
    return checked, unnamed


def spoken(info: dict) -> str:
    """A task row's accessible name, as app.js words it, from the API's description of the task."""
    size = info["preprocess"]["size"]
    facts = (
        f"{info['num_classes']} labels, input {size} px{' gray' if info['preprocess']['grayscale'] else ''}, "
        f"{info['bits_per_parameter']:.3f} bits per parameter, mask density {100 * info['mask_density']:.1f}%"
    )
    return f"{info['name']}, version {info['version']}, {facts}, {'resident' if info['resident'] else 'not resident'}"


def as_seconds(text: str) -> float:
    number, unit = text.split()
    return float(number) / (1000 if unit == "ms" else 1)


def single_observation_quantiles(base: str, task: str) -> tuple[float, float]:
    """p50 and p99 of a histogram holding one observation, from the server's own buckets, as Prometheus would."""
    buckets = []
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("piggyback_request_latency_seconds_bucket{") and f'task="{task}"' in line:
            if 'status="200"' in line:
                le = re.search(r'le="([^"]+)"', line)[1]
                buckets.append((float(le.replace("+Inf", "inf")), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    assert buckets[-1][1] == 1, buckets  # the page's first poll came before the one prediction
    index = next(i for i, (_, count) in enumerate(buckets) if count >= 1)
    lower, upper = (buckets[index - 1][0] if index else 0.0), buckets[index][0]
    return lower + 0.5 * (upper - lower), lower + 0.99 * (upper - lower)


def test_try_it_page_in_a_browser(server, browser, tmp_path):
    listed = {task["name"]: task for task in httpx.get(f"{server}/tasks", params={"limit": 100}).json()}
    described = {name: httpx.get(f"{server}/tasks/{name}").json() for name in ("imagenet", "digits", "mnist")}
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    weights = offline_weights(DEMO_ARCH)
    expected_top1 = {p.name: categories[torchvision_probabilities(weights, p).argmax()] for p in PHOTOS}

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server}/")

    # the tasks, a page at a time, with what GET /tasks/{name} says about the cold ones
    options = page.get_by_role("listbox", name="Tasks").get_by_role("option")
    expect(options).to_have_count(len(listed), timeout=TIMEOUT_MS)  # 25 a page unless the reader asks otherwise
    expect(page.locator("#page-info")).to_have_text(f"Tasks 1–{len(listed)} of {len(listed)}")
    assert [listed["imagenet"]["status"], listed["mnist"]["status"]] == ["serving", "registered"]
    for name, info in described.items():
        expect(page.locator(f'[role=option][data-name="{name}"]')).to_have_attribute("aria-label", spoken(info))
    expect(page.locator("#backbone-arch")).to_have_text(DEMO_ARCH)
    expect(page.locator("#backbone-fingerprint")).to_have_text(described["imagenet"]["backbone"]["fingerprint"])
    expect(page.locator("#server-status")).to_have_text(re.compile(rf"^Ready: {len(listed)} tasks served, 2 resident"))
    assert problems == [], problems

    # keyboard: the search, the task list (Space and Enter pick), the file input and the submit control
    stops = tab_until(page, lambda stop: stop["id"] == "task-search")
    stops += tab_until(page, lambda stop: stop["role"] == "option")
    assert stops[-1]["name"] == "digits"  # the list is one tab stop: its first task
    page.keyboard.press(" ")
    expect(page.locator("#chosen-task")).to_have_text("digits")
    expect(page.locator("#task-detail")).to_contain_text("10: 0, 1, 2, 3, 4, 5, 6, 7, …")
    page.keyboard.press("ArrowDown")
    assert focused(page)["name"] == "imagenet"
    page.keyboard.press("Enter")
    expect(page.locator("#chosen-task")).to_have_text("imagenet")
    expect(page.locator('[role=option][aria-selected="true"]')).to_have_attribute("data-name", "imagenet")
    stops += tab_until(page, lambda stop: stop["id"] == "image-input")
    page.locator("#image-input").set_input_files([str(p) for p in PHOTOS])  # a file dialog is no keyboard matter
    stops += tab_until(page, lambda stop: stop["id"] == "predict-submit")
    assert all(stop["ring"] for stop in stops), [stop for stop in stops if not stop["ring"]]
    checked, unnamed = unnamed_controls(page)
    assert checked > len(listed) and unnamed == [], unnamed
    assert page.locator("#results").get_attribute("aria-live") == "polite"
    assert page.locator("#predict-error").get_attribute("role") == "alert"

    # classify the photos: each shown with its top-k bars, the top label torchvision's, and the latency
    page.keyboard.press("Enter")
    for photo in PHOTOS:
        figure = page.locator(f'figure.result[data-file="{photo.name}"]')
        expect(figure.locator(".top1")).to_have_text(expected_top1[photo.name], timeout=TIMEOUT_MS)
        expect(figure.locator(".topk li")).to_have_count(5)
        loaded = figure.locator("img").evaluate("img => img.complete && img.naturalWidth > 0 && img.src")
        assert loaded and loaded.startswith("blob:"), "the preview must load under the page's CSP"
    expect(page.locator(".results .summary")).to_have_text(re.compile(r"^imagenet v1: 2 images in \d+ ms$"))

    # live traffic: the page's own rate and quantiles, from two polls of /metrics around the one prediction
    row = page.locator('#live-table tr[data-task="imagenet"]')
    expect(row).to_be_visible(timeout=TIMEOUT_MS)
    rate, errors, p50, p99 = (cell.inner_text() for cell in row.locator("td").all())
    assert float(rate) > 0 and float(errors) == 0
    want_p50, want_p99 = single_observation_quantiles(server, "imagenet")
    # to the page's display precision: 0.1 ms below 10 ms, 1 ms below 1 s, then 10 ms
    assert as_seconds(p50) == pytest.approx(want_p50, rel=0.005, abs=0.0006)
    assert as_seconds(p99) == pytest.approx(want_p99, rel=0.005, abs=0.0006)
    screenshot = SCREENSHOT if os.environ.get("PIGGYBACK_UPDATE_SCREENSHOT") == "1" else tmp_path / "ui.png"
    page.screenshot(path=str(screenshot), full_page=True)

    # the API's own words for a file that is not an image
    page.get_by_role("button", name="Clear images").click()
    note = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"these are not pixels"}
    page.locator("#image-input").set_input_files(note)
    page.get_by_role("button", name="Classify").click()
    upload = {"images": (note["name"], note["buffer"], note["mimeType"])}
    refusal = httpx.post(f"{server}/tasks/imagenet/predict", files=upload)
    assert refusal.status_code == 415
    words = re.escape(f"imagenet: 415 Unsupported Media Type: {refusal.json()['detail']}")
    expect(page.locator("#predict-error")).to_have_text(re.compile(rf"^{words} \(after \d+ ms\)$"))

    # a full queue's 503 and its Retry-After, as the API words it (played by the browser: overload is not the point)
    overloaded = "server overloaded: 64 predictions in flight (at most 64); retry after 1 s"
    page.route(
        "**/tasks/imagenet/predict*",
        lambda route: route.fulfill(
            status=503, headers={"Retry-After": "1"}, content_type="application/json",
            body=json.dumps({"detail": overloaded}),
        ),
    )  # fmt: skip
    page.get_by_role("button", name="Classify").click()
    words = re.escape(f"imagenet: 503 Service Unavailable: {overloaded} (Retry-After: 1 s)")
    expect(page.locator("#predict-error")).to_have_text(re.compile(rf"^{words} \(after \d+ ms\)$"))
    page.unroute("**/tasks/imagenet/predict*")

    # a cold task answers, and the page then says it is resident here
    mnist = page.locator('[role=option][data-name="mnist"]')
    expect(mnist).to_have_attribute("aria-label", re.compile(r", not resident$"))
    mnist.click()
    page.get_by_role("button", name="Clear images").click()
    page.locator("#image-input").set_input_files(str(PHOTOS[0]))
    page.get_by_role("button", name="Classify").click()
    expect(page.locator(".results .summary")).to_have_text(re.compile(r"^mnist v1: 1 image in \d+ ms$"))
    expect(mnist).to_have_attribute("aria-label", re.compile(r", resident$"))
    expect(page.locator("#task-detail")).to_contain_text("Residentyes")

    # paging and search, both through the API's paging
    page.get_by_role("combobox", name="Tasks per page").select_option("10")
    expect(page.locator("#page-info")).to_have_text(f"Tasks 1–10 of {len(listed)}")
    expect(options).to_have_count(10)
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#page-info")).to_have_text(f"Tasks 11–{len(listed)} of {len(listed)}")
    expect(options).to_have_count(len(listed) - 10)
    expect(options.first).to_have_attribute("data-name", sorted(listed)[10])
    page.get_by_role("button", name="Previous page").click()
    expect(options).to_have_count(10)
    expect(options.first).to_have_attribute("data-name", "digits")
    search = page.get_by_role("searchbox", name="Search tasks")
    search.fill("task-0")  # 12 matches: a page of 10 from just before them, then the Link header's next page
    expect(page.locator("#page-info")).to_have_text("Tasks starting with “task-0”: 1–10, more on the next page")
    expect(options.first).to_have_attribute("data-name", "task-000")
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#page-info")).to_have_text("Tasks starting with “task-0”: 11–12")
    expect(options).to_have_count(2)
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    search.fill("mn")
    expect(options).to_have_count(1)
    expect(options.first).to_have_attribute("data-name", "mnist")
    search.fill("zz")
    expect(page.locator("#page-info")).to_have_text("No task name starts with “zz”.")
    expect(options).to_have_count(0)

    # the only console errors are the browser's own notes of the deliberate 415 and 503
    assert [text for text in problems if not re.search(r"status of (415|503)\b", text)] == [], problems
    assert len(problems) == 2, problems
    # same origin only (offline), the public routes only, never /admin
    paths = {url.removeprefix(server).split("?")[0] for url in requested if not url.startswith("blob:")}
    assert all(url.startswith((server + "/", "blob:")) for url in requested), requested
    public = re.compile(r"^/(|ui/app\.js|ui/style\.css|readyz|metrics|tasks|tasks/[\w.-]+|tasks/[\w.-]+/predict)$")
    assert {path for path in paths if not public.match(path)} == set(), paths
    page.close()
