"use strict";
/*
 * The try-it page. A client of the public API like any other: GET tasks (paged), tasks/{name}, readyz and
 * metrics, POST tasks/{name}/predict; never the admin routes. URLs are relative to the page, so it works
 * behind a path prefix too. No framework and no build step: what is here is what the browser runs.
 */
(() => {
  const DETAIL_FETCHES = 4; // concurrent GET tasks/{name} filling in a page's cold tasks
  const POLL_MS = 3000;
  const KEEP_MS = 16 * 60 * 1000; // the longest window, and a poll to spare
  const NAME_MAX = 64; // mask_store's TASK_NAME_PATTERN: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
  const UNKNOWN_TASK = "_unknown"; // service/metrics.py counts requests for unknown names under it

  const $ = (id) => document.getElementById(id);

  /** A new element: `text` sets its text, other keys are attributes (false/null leave them out). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  const percent = (x) => `${(100 * x).toFixed(1)}%`;
  const bytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);
  const seconds = (s) => (s === null ? "—" : s < 1 ? `${(1000 * s).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`);

  /** The API's own words for a failed answer: "415 Unsupported Media Type: <detail>", and its Retry-After. */
  async function failure(response) {
    let detail;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch {
      detail = "(the answer was not JSON)";
    }
    let text = `${response.status}${response.statusText ? ` ${response.statusText}` : ""}: ${detail}`;
    const retry = response.headers.get("Retry-After");
    if (retry !== null) text += ` (Retry-After: ${retry} s)`;
    return text;
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(await failure(response));
    return { body: await response.json(), response };
  }

  // ---- server status and backbone -------------------------------------------------------------------------

  let ready = false;

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text; // unchanged text is not announced again
  }

  async function checkReady() {
    try {
      const response = await fetch("readyz");
      const body = await response.json();
      if (response.ok) {
        const failed = Object.keys(body.failed_tasks || {}).length;
        let text = `Ready: ${body.tasks} tasks served, ${body.resident_tasks} resident on this replica`;
        if (failed) text += `, ${failed} failed to load`;
        if (body.store_problem) text += `. Store: ${body.store_problem}`;
        setText($("server-status"), text);
      } else {
        setText($("server-status"), `Not ready (${response.status}): ${body.detail}`);
      }
      ready = response.ok;
    } catch (error) {
      setText($("server-status"), `Server unreachable: ${error.message}`);
      ready = false;
    }
    return ready;
  }

  /** Every task of a replica is over the same backbone: the first full description names it. */
  function showBackbone(info) {
    if (!info || !info.backbone) return;
    setText($("backbone-arch"), info.backbone.arch);
    setText($("backbone-fingerprint"), info.backbone.fingerprint);
  }

  // ---- the task list: the API's paging, a listbox with one tab stop ---------------------------------------

  /*
   * Search walks the API's own paging, it does not filter only what is loaded: names are sorted, so the
   * tasks starting with a prefix are one contiguous run. The first page asks `after=` the largest string
   * below that run, later pages continue with the Link header's `after`, and a page that leaves the run
   * ends it. One request per page of results, at 10,000 tasks as at 3.
   */
  function justBefore(prefix) {
    // Names are at most NAME_MAX characters, each below "~": the prefix's last character lowered by one,
    // then NAME_MAX "~", sorts after every name before the prefix and before the prefix itself.
    const last = prefix.charCodeAt(prefix.length - 1);
    return prefix.slice(0, -1) + String.fromCharCode(last - 1) + "~".repeat(NAME_MAX);
  }

  const list = {
    prefix: "",
    starts: [null], // the `after` of each page seen: Previous walks back through them
    page: 0,
    next: null, // the `after` of the following page, null on the last one
    rows: [], // what GET tasks answered for this page (and matches the prefix)
    total: null,
    selected: null, // the picked task's name
    active: 0, // the option holding the list's tab stop
    generation: 0, // a newer listing makes older answers stale
    loaded: false,
  };
  const described = new Map(); // "name@version" -> TaskInfo, from GET tasks/{name}

  const describedKey = (task) => `${task.name}@${task.version}`;
  const pageSize = () => Number($("page-size").value);

  function nextAfter(linkHeader) {
    const match = /<([^>]*)>\s*;\s*rel="next"/.exec(linkHeader || "");
    return match ? new URL(match[1], window.location.href).searchParams.get("after") : null;
  }

  async function loadPage() {
    const generation = ++list.generation;
    const after = list.starts[list.page];
    const query = new URLSearchParams({ limit: String(pageSize()) });
    if (after !== null) query.set("after", after);
    setText($("page-info"), "Loading tasks…");
    let body;
    let response;
    try {
      ({ body, response } = await getJSON(`tasks?${query}`));
    } catch (error) {
      if (generation === list.generation) setText($("page-info"), `Could not list the tasks: ${error.message}`);
      return;
    }
    if (generation !== list.generation) return;
    list.loaded = true;
    const rows = body.filter((task) => task.name.startsWith(list.prefix));
    const leftTheRun = rows.length < body.length;
    list.rows = rows;
    list.total = Number(response.headers.get("X-Total-Count"));
    list.next = leftTheRun ? null : nextAfter(response.headers.get("Link"));
    list.active = Math.max(0, rows.findIndex((task) => task.name === list.selected));
    renderTasks();
    const resident = rows.find((task) => task.status === "serving");
    if (resident) showBackbone(resident);
    describeCold(generation);
  }

  function renderTasks() {
    const first = list.page * pageSize() + 1;
    const last = first + list.rows.length - 1;
    let info;
    if (list.prefix) {
      info = list.rows.length
        ? `Tasks starting with “${list.prefix}”: ${first}–${last}${list.next ? ", more on the next page" : ""}`
        : `No task name starts with “${list.prefix}”.`;
    } else {
      info = list.rows.length ? `Tasks ${first}–${last} of ${list.total}` : "No tasks registered yet.";
    }
    setText($("page-info"), info);
    $("page-prev").disabled = list.page === 0;
    $("page-next").disabled = list.next === null;
    $("task-list").replaceChildren(...list.rows.map(taskOption));
  }

  function taskOption(task, index) {
    const option = h("div", {
      role: "option",
      id: `task-option-${index}`,
      class: "task-row",
      "data-name": task.name,
      "aria-selected": String(task.name === list.selected),
      tabindex: index === list.active ? "0" : "-1",
    });
    fillOption(option, task);
    return option;
  }

  /** The row's cells and its spoken name: listed facts, or a cold task's described ones once they arrive. */
  function fillOption(option, task) {
    const info = task.status === "serving" ? task : described.get(describedKey(task));
    const cell = (text, cls) => h("span", { class: cls || null, text });
    if (task.status === "failed") {
      option.replaceChildren(cell(task.name, "name"), cell("failed", "status failed"), cell(task.error, "error-text"));
      option.setAttribute("aria-label", `${task.name}, failed to load: ${task.error}`);
      return;
    }
    const pending = "…";
    const input = info ? `${info.preprocess.size} px${info.preprocess.grayscale ? " gray" : ""}` : pending;
    option.replaceChildren(
      cell(task.name, "name"),
      cell(task.status, `status ${task.status}`),
      cell(`v${task.version}`),
      cell(info ? String(info.num_classes) : pending),
      cell(input),
      cell(info ? info.bits_per_parameter.toFixed(3) : pending),
      cell(info ? percent(info.mask_density) : pending),
      cell(task.resident ? "yes" : "no"),
    );
    const facts = info
      ? `, ${info.num_classes} labels, input ${input}, ${info.bits_per_parameter.toFixed(3)} bits per parameter, ` +
        `mask density ${percent(info.mask_density)}`
      : "";
    option.setAttribute(
      "aria-label",
      `${task.name}, version ${task.version}${facts}, ${task.resident ? "resident" : "not resident"}`,
    );
  }

  /** Cold tasks list only name, version and identity: their facts come from GET tasks/{name}, a few at a time. */
  async function describeCold(generation) {
    const queue = list.rows.filter((task) => task.status === "registered" && !described.has(describedKey(task)));
    const worker = async () => {
      for (let task = queue.shift(); task; task = queue.shift()) {
        try {
          const { body } = await getJSON(`tasks/${encodeURIComponent(task.name)}`);
          described.set(describedKey(task), body);
          showBackbone(body);
        } catch {
          continue; // removed meanwhile, say: the row keeps its listed facts
        }
        if (generation !== list.generation) return;
        const option = $("task-list").querySelector(`[data-name="${CSS.escape(task.name)}"]`);
        if (option) fillOption(option, task);
      }
    };
    await Promise.all(Array.from({ length: DETAIL_FETCHES }, worker));
  }

  function options() {
    return [...$("task-list").querySelectorAll('[role="option"]')];
  }

  function moveTo(index, focus) {
    const all = options();
    if (!all.length) return;
    list.active = Math.max(0, Math.min(all.length - 1, index));
    all.forEach((option, i) => option.setAttribute("tabindex", i === list.active ? "0" : "-1"));
    if (focus) all[list.active].focus();
  }

  function pick(index) {
    const task = list.rows[index];
    if (!task) return;
    list.selected = task.name;
    options().forEach((option, i) => option.setAttribute("aria-selected", String(i === index)));
    setText($("chosen-task"), task.name);
    showDetail(task.name);
  }

  async function showDetail(name) {
    const detail = $("task-detail");
    detail.hidden = false;
    detail.replaceChildren(h("dt", { text: "Loading" }), h("dd", { text: name }));
    let info;
    try {
      ({ body: info } = await getJSON(`tasks/${encodeURIComponent(name)}`));
    } catch (error) {
      if (list.selected === name) detail.replaceChildren(h("dt", { text: "Error" }), h("dd", { text: error.message }));
      return;
    }
    if (list.selected !== name) return;
    showBackbone(info);
    const p = info.preprocess;
    const input = `${p.size}×${p.size}${p.resize ? ` crop of ${p.resize}` : ""}${p.grayscale ? ", grayscale" : ", RGB"}`;
    const labels = info.labels.slice(0, 8).join(", ") + (info.labels.length > 8 ? ", …" : "");
    const facts = [
      ["Version", String(info.version)],
      ["Labels", `${info.num_classes}: ${labels}`],
      ["Input", input],
      ["Bits per parameter", info.bits_per_parameter.toFixed(4)],
      ["Mask density", percent(info.mask_density)],
      ["Mask", `${info.mask_kind}, ${info.masked_parameters.toLocaleString()} parameters, ${bytes(info.mask_stored_bytes)}`],
      ["Resident", info.resident ? `yes${info.weights_cached ? ", weights cached" : ""}` : "no: loads on first use"],
      ["Identity", info.identity.slice(0, 16)],
    ];
    detail.replaceChildren(...facts.flatMap(([term, value]) => [h("dt", { text: term }), h("dd", { text: value })]));
  }

  function wireTaskList() {
    const box = $("task-list");
    box.addEventListener("keydown", (event) => {
      const moves = { ArrowDown: 1, ArrowUp: -1 };
      if (event.key in moves) moveTo(list.active + moves[event.key], true);
      else if (event.key === "Home") moveTo(0, true);
      else if (event.key === "End") moveTo(options().length - 1, true);
      else if (event.key === "Enter" || event.key === " ") pick(list.active);
      else return;
      event.preventDefault();
    });
    box.addEventListener("click", (event) => {
      const option = event.target.closest('[role="option"]');
      if (!option) return;
      const index = options().indexOf(option);
      moveTo(index, true);
      pick(index);
    });

    let typing = null;
    $("task-search").addEventListener("input", (event) => {
      clearTimeout(typing);
      typing = setTimeout(() => {
        list.prefix = event.target.value.trim();
        list.starts = [list.prefix ? justBefore(list.prefix) : null];
        list.page = 0;
        loadPage();
      }, 250);
    });
    // a pager button that turns disabled under the keyboard's focus hands it to the list, not to the page
    const keepFocus = async (button) => {
      await loadPage();
      if (button.disabled) moveTo(0, true);
    };
    $("page-next").addEventListener("click", (event) => {
      if (list.next === null) return;
      list.starts[list.page + 1] = list.next;
      list.page += 1;
      keepFocus(event.currentTarget);
    });
    $("page-size").addEventListener("change", () => {
      list.starts = [list.starts[0]]; // back to the first page of the same search
      list.page = 0;
      loadPage();
    });
    $("page-prev").addEventListener("click", (event) => {
      if (list.page === 0) return;
      list.page -= 1;
      keepFocus(event.currentTarget);
    });
  }

  // ---- images in, predictions out ---------------------------------------------------------------------------

  const chosen = []; // File objects, in upload order
  let previews = []; // object URLs of the shown results, revoked when replaced

  function addFiles(files) {
    chosen.push(...files);
    renderChosen();
  }

  function renderChosen() {
    $("chosen-files").replaceChildren(
      ...chosen.map((file, index) => {
        const remove = h("button", { type: "button", class: "link", "aria-label": `Remove ${file.name}`, text: "Remove" });
        remove.addEventListener("click", () => {
          chosen.splice(index, 1);
          renderChosen();
          const buttons = $("chosen-files").querySelectorAll("button");
          (buttons[Math.min(index, buttons.length - 1)] || $("image-input")).focus(); // focus stays in the list
        });
        return h("li", {}, `${file.name} (${bytes(file.size)}) `, remove);
      }),
    );
    $("clear-files").disabled = chosen.length === 0;
  }

  function showError(text) {
    $("predict-error").textContent = text;
  }

  let classifying = false;

  async function classify(event) {
    event.preventDefault();
    if (classifying) return; // one request at a time; the button stays focusable (disabling it drops focus)
    showError("");
    if (list.selected === null) return showError("Pick a task from the list first.");
    if (!chosen.length) return showError("Choose, drop or capture at least one image first.");
    const topK = Number($("top-k").value) || 5;
    const files = chosen.slice();
    const form = new FormData();
    for (const file of files) form.append("images", file, file.name);
    const name = list.selected;
    const url = `tasks/${encodeURIComponent(name)}/predict?top_k=${encodeURIComponent(topK)}`;
    const submit = $("predict-submit");
    classifying = true;
    submit.setAttribute("aria-disabled", "true");
    $("results").setAttribute("aria-busy", "true");
    const started = performance.now();
    try {
      const response = await fetch(url, { method: "POST", body: form });
      const elapsed = performance.now() - started;
      if (!response.ok) return showError(`${name}: ${await failure(response)} (after ${elapsed.toFixed(0)} ms)`);
      showResults(await response.json(), files, elapsed);
      if (list.selected === name) showDetail(name); // a cold task is resident after its first prediction
      loadPage();
    } catch (error) {
      showError(`${name}: the request failed: ${error.message}`);
    } finally {
      classifying = false;
      submit.removeAttribute("aria-disabled");
      $("results").removeAttribute("aria-busy");
    }
  }

  function showResults(body, files, elapsed) {
    previews.forEach((url) => URL.revokeObjectURL(url));
    previews = [];
    const count = files.length === 1 ? "1 image" : `${files.length} images`;
    const summary = h("p", { class: "summary", text: `${body.task} v${body.version}: ${count} in ${elapsed.toFixed(0)} ms` });
    const figures = body.predictions.map((prediction, index) => {
      const file = files[index];
      const url = URL.createObjectURL(file);
      previews.push(url);
      const bars = prediction.top_k.map((item) => {
        const fill = h("span", { class: "fill" });
        fill.style.width = percent(item.score);
        return h(
          "li",
          {},
          h("span", { class: "label", text: item.label }),
          h("span", { class: "bar", "aria-hidden": "true" }, fill),
          h("span", { class: "score", text: percent(item.score) }),
        );
      });
      return h(
        "figure",
        { class: "result", "data-file": file.name },
        h("img", { src: url, alt: file.name }),
        h(
          "figcaption",
          {},
          h("span", { class: "file", text: file.name }),
          " → ",
          h("strong", { class: "top1", text: prediction.label }),
          ` (${percent(prediction.score)})`,
        ),
        h("ol", { class: "topk", "aria-label": `Top labels for ${file.name}` }, ...bars),
      );
    });
    $("results").replaceChildren($("results-title"), summary, ...figures);
  }

  function wireImages() {
    const input = $("image-input");
    input.addEventListener("change", () => {
      addFiles([...input.files]);
      input.value = ""; // the same file may be chosen again
    });
    const zone = $("drop-zone");
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      addFiles([...event.dataTransfer.files]);
    });
    // a file dropped beside the zone must not navigate away from the page
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    $("clear-files").addEventListener("click", () => {
      chosen.length = 0;
      renderChosen();
      input.focus(); // the button it was on is disabled now
    });
    $("predict-form").addEventListener("submit", classify);
    wireWebcam();
  }

  /** A webcam frame becomes one more JPEG in the list, where the browser offers getUserMedia (secure contexts). */
  function wireWebcam() {
    if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) return;
    $("webcam").hidden = false;
    const video = $("webcam-video");
    let stream = null;
    let frames = 0;
    const showing = (on) => {
      $("webcam-start").hidden = on;
      $("webcam-capture").hidden = !on;
      $("webcam-stop").hidden = !on;
      video.hidden = !on;
    };
    $("webcam-start").addEventListener("click", async () => {
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
        video.srcObject = stream;
        await video.play();
        showing(true);
        $("webcam-capture").focus();
      } catch (error) {
        showError(`Webcam: ${error.name}: ${error.message}`);
      }
    });
    $("webcam-capture").addEventListener("click", () => {
      const canvas = document.createElement("canvas");
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      canvas.toBlob((blob) => {
        if (blob) addFiles([new File([blob], `webcam-${++frames}.jpg`, { type: "image/jpeg" })]);
      }, "image/jpeg", 0.92);
    });
    $("webcam-stop").addEventListener("click", () => {
      if (stream) stream.getTracks().forEach((track) => track.stop());
      stream = null;
      video.srcObject = null;
      showing(false);
      $("webcam-start").focus();
    });
  }

  // ---- live traffic from /metrics: rates and quantiles from histogram deltas, in the browser -----------------

  const bound = (text) => (text === "+Inf" ? Infinity : text === "-Inf" ? -Infinity : Number(text));

  /** Prometheus text exposition -> [{name, labels, value}]; comments and blank lines skipped. */
  function parsePrometheus(text) {
    const samples = [];
    const lineRe = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = lineRe.exec(line);
      if (!match) continue;
      const labels = {};
      const labelRe = /\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?/y;
      for (let m = labelRe.exec(match[2] || ""); m; m = labelRe.exec(match[2])) {
        labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: match[1], labels, value: bound(match[3]) });
    }
    return samples;
  }

  /** Per task: cumulative requests, errors, and status-200 latency buckets (summed over label sets). */
  function tally(samples) {
    const tasks = new Map();
    const of = (task) => {
      if (!tasks.has(task)) tasks.set(task, { count: 0, errors: 0, buckets: new Map() });
      return tasks.get(task);
    };
    for (const { name, labels, value } of samples) {
      if (name === "piggyback_request_latency_seconds_count") {
        const entry = of(labels.task);
        entry.count += value;
        if (Number(labels.status) >= 400) entry.errors += value;
      } else if (name === "piggyback_request_latency_seconds_bucket" && labels.status === "200") {
        const entry = of(labels.task);
        const le = bound(labels.le);
        entry.buckets.set(le, (entry.buckets.get(le) || 0) + value);
      }
    }
    return tasks;
  }

  /** histogram_quantile as Prometheus computes it: linear within the bucket; past the last finite bound, that bound. */
  function quantile(q, cumulative) {
    const total = cumulative.length ? cumulative[cumulative.length - 1][1] : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const [le, count] of cumulative) {
      if (count >= rank) {
        if (le === Infinity) return lower;
        return lower + (le - lower) * ((rank - below) / (count - below || 1));
      }
      lower = le;
      below = count;
    }
    return lower;
  }

  const live = { snapshots: [], replica: null };
  const EMPTY = { count: 0, errors: 0, buckets: new Map() };

  /** One task's traffic between two snapshots; a counter that went down was reset (a restart), counted from 0. */
  function between(before, after) {
    const base = after.count < before.count ? EMPTY : before;
    const cumulative = [...after.buckets.entries()]
      .map(([le, count]) => [le, count - (base.buckets.get(le) || 0)])
      .sort((a, b) => a[0] - b[0]);
    return { count: after.count - base.count, errors: after.errors - base.errors, cumulative };
  }

  function renderLive() {
    const snaps = live.snapshots;
    const windowMs = 1000 * Number($("live-window").value);
    const last = snaps[snaps.length - 1];
    const inWindow = last ? snaps.filter((snap) => snap.t >= last.t - windowMs) : [];
    const first = inWindow[0];
    if (!last || first === last) {
      setText($("live-summary"), "Collecting: the first rates appear after two polls.");
      return;
    }
    const span = (last.t - first.t) / 1000;
    const rows = [];
    let total = 0;
    for (const [task, now] of last.tasks) {
      const d = between(first.tasks.get(task) || EMPTY, now);
      if (d.count <= 0) continue;
      total += d.count;
      rows.push([task, d.count / span, d.errors / span, quantile(0.5, d.cumulative), quantile(0.99, d.cumulative)]);
    }
    rows.sort((a, b) => b[1] - a[1]);
    $("live-table").tBodies[0].replaceChildren(
      ...rows.map(([task, rate, errors, p50, p99]) =>
        h(
          "tr",
          { "data-task": task },
          h("th", { scope: "row", text: task === UNKNOWN_TASK ? "(unknown task names)" : task }),
          h("td", { text: rate.toFixed(2) }),
          h("td", { text: errors.toFixed(2) }),
          h("td", { text: seconds(p50) }),
          h("td", { text: seconds(p99) }),
        ),
      ),
    );
    // one step per poll interval: the rate held over it, not a point that suggests an instant
    const series = inWindow.slice(1).flatMap((snap, i) => {
      const previous = inWindow[i];
      let count = 0;
      for (const [task, now] of snap.tasks) count += between(previous.tasks.get(task) || EMPTY, now).count;
      const rate = count / ((snap.t - previous.t) / 1000);
      return [[previous.t, rate], [snap.t, rate]];
    });
    drawChart(series, first.t, last.t);
    const peak = Math.max(0, ...series.map(([, rate]) => rate));
    setText(
      $("live-summary"),
      `${(total / span).toFixed(2)} predictions/s over the last ${Math.round(span)} s (peak ${peak.toFixed(2)}/s), ` +
        `${rows.length} task${rows.length === 1 ? "" : "s"} with traffic.`,
    );
  }

  function drawChart(series, from, to) {
    const svg = $("live-chart");
    const ns = "http://www.w3.org/2000/svg";
    const title = svg.querySelector("title");
    const peak = Math.max(1e-9, ...series.map(([, rate]) => rate));
    const x = (t) => (600 * (t - from)) / Math.max(1, to - from);
    const y = (rate) => 85 - (80 * rate) / peak;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", series.map(([t, rate]) => `${x(t).toFixed(1)},${y(rate).toFixed(1)}`).join(" "));
    line.setAttribute("class", "series");
    svg.replaceChildren(title, line);
  }

  async function pollMetrics() {
    let response;
    try {
      response = await fetch("metrics");
    } catch {
      return; // the status line already says the server is unreachable
    }
    if (!response.ok) return;
    const text = await response.text();
    const replica = response.headers.get("X-Piggyback-Replica");
    if (replica !== live.replica) live.snapshots = []; // another process: its counters are not comparable
    live.replica = replica;
    const t = Date.now();
    live.snapshots.push({ t, tasks: tally(parsePrometheus(text)) });
    live.snapshots = live.snapshots.filter((snap) => snap.t >= t - KEEP_MS);
    renderLive();
  }

  async function poll() {
    try {
      await checkReady();
      if (ready && !list.loaded) loadPage(); // came up since the page loaded: list what it serves
      if ($("live-on").checked && !document.hidden) await pollMetrics();
    } finally {
      setTimeout(poll, POLL_MS); // a failed poll never stops the next one
    }
  }

  function start() {
    wireTaskList();
    wireImages();
    $("live-window").addEventListener("change", renderLive);
    checkReady().then(() => {
      if (ready) loadPage(); // else the poll lists the tasks once the server is ready
      pollMetrics();
      setTimeout(poll, POLL_MS);
    });
  }

  start();
})();
