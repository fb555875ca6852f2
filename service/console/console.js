// The RICE web console: plain JavaScript against the service's own JSON API (same origin, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 24;
const IMAGE_NAME = /\.(jpe?g|png|webp|bmp|tiff?)$/i;
let browseOffset = 0;
let browseSeq = 0; // only the newest gallery request may draw the list (answers can arrive out of order)
let galleryItems = null; // from /v1/info: tells "empty gallery" from "nothing in this shop"
const thumbs = new Map(); // item id -> object URL, for this page's life (revoked when an item changes)

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// fetch + the service's error body ({"error": {"code", "message"}}) turned into one readable line.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (err) {
    throw new Error(`cannot reach the service: ${err.message}`);
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || JSON.stringify(body);
    } catch (_) { /* not JSON: keep the status text */ }
    const error = new Error(`HTTP ${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// An item's own URL, with its shop: a shop-sharded deployment routes on it (README "Sharding by shop").
function itemPath(itemId, shop, suffix = "") {
  const query = shop ? `?${new URLSearchParams({ shop_id: shop })}` : "";
  return `/v1/gallery/items/${encodeURIComponent(itemId)}${suffix}${query}`;
}

// Thumbnails are fetched (not plain <img src>) so that the API key travels when reads need one.
function thumbnail(itemId, shop) {
  const img = el("img", { alt: itemId, "data-item": itemId });
  const cached = thumbs.get(itemId);
  if (cached) {
    img.src = cached;
    return img;
  }
  api(itemPath(itemId, shop, "/thumbnail"))
    .then((r) => r.blob())
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      thumbs.set(itemId, url);
      img.src = url;
    })
    .catch(() => img.classList.add("missing"));
  return img;
}

function forget(itemId) {
  const url = thumbs.get(itemId);
  if (url) URL.revokeObjectURL(url);
  thumbs.delete(itemId);
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    const g = info.gallery;
    galleryItems = g.items;
    $("model").textContent = `model ${info.model_version} · ${g.items} items, ${g.skus} SKUs · match from ${info.match_threshold.toFixed(2)}`;
    $("warning").textContent = g.warning || "";
    $("warning").hidden = !g.warning;
  } catch (err) {
    $("model").textContent = err.status === 401 || err.status === 403 ? "enter an API key with read rights" : err.message;
  }
}

function isImage(file) {
  return file.type.startsWith("image/") || IMAGE_NAME.test(file.name);
}

// The Recognize tab's own options; the gallery's "Try" passes its own, so one tab never uses another's fields.
function recognizeOptions() {
  return { topK: $("top-k").value || "5", shop: $("shop-id").value.trim(), numFrames: $("num-frames").value || "10" };
}

async function recognize(blob, asImage, options = recognizeOptions()) {
  $("result").hidden = true; // the previous answer must not stand under this request's error
  const params = new URLSearchParams({ top_k: options.topK });
  const shop = options.shop;
  if (shop) params.set("shop_id", shop);
  if (!asImage) params.set("num_frames", options.numFrames);
  const form = new FormData();
  form.append("file", blob, blob.name || "query");
  const path = asImage ? "/v1/recognize/image" : "/v1/recognize";
  const answer = await (await api(`${path}?${params}`, { method: "POST", body: form })).json();
  renderRecognition(answer, shop, asImage ? blob : null);
}

const SVG = "http://www.w3.org/2000/svg";
let queryUrl = null;

// Where the top SKU was found (results[0].box: a frame index and the catalog image's corners in that
// frame's pixels): drawn over a still; for a clip, the frame is named (the browser holds no decoded frames).
function renderBox(top, image) {
  const figure = $("located");
  const overlay = $("box-overlay");
  overlay.replaceChildren();
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = null;
  const box = top && top.box;
  figure.hidden = !box;
  if (!box) return;
  const points = box.polygon.map(([x, y]) => `${x},${y}`).join(" ");
  $("located-caption").textContent = `${top.sku} found with ${top.inliers} matching keypoints` + (image ? "" : ` in frame ${box.frame}`);
  const img = $("query-image");
  img.hidden = !image;
  if (!image) return;
  img.onload = () => {
    overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    const poly = document.createElementNS(SVG, "polygon");
    poly.setAttribute("points", points);
    overlay.append(poly);
  };
  queryUrl = URL.createObjectURL(image);
  img.src = queryUrl;
}

function renderRecognition(answer, shop, image = null) {
  const verdict = $("verdict");
  const top = answer.results[0];
  if (!top) {
    if (galleryItems === 0 || !shop) verdict.textContent = "No results: the gallery is empty (see the warning above, if any)";
    else verdict.textContent = `No results: shop "${shop}" has no items (the gallery holds ${galleryItems})`;
  } else if (answer.match_probability != null) {
    const p = `match probability ${answer.match_probability.toFixed(2)}`;
    verdict.textContent = answer.match ? `Match: ${top.sku} (${p})` : `No match: best ${top.sku} (${p})`;
  } else if (answer.match) {
    verdict.textContent = `Match: ${top.sku} (score ${top.score.toFixed(3)} ≥ ${answer.match_threshold.toFixed(2)})`;
  } else {
    verdict.textContent = `No match: best ${top.sku} scores ${top.score.toFixed(3)} < ${answer.match_threshold.toFixed(2)}`;
  }
  renderBox(top, image);
  verdict.className = answer.match ? "match" : "no-match";
  verdict.dataset.match = String(answer.match);
  const list = $("results");
  list.replaceChildren();
  answer.results.forEach((r, i) => {
    // A feedback view (a confirmed answer's clip) has no catalog image to show.
    const picture = r.source === "feedback" ? el("span", { class: "small view", text: "feedback view" }) : thumbnail(r.item_id, r.shop_id);
    const pick = el("button", { type: "button", class: "small", text: i === 0 ? "correct" : "this one" });
    pick.addEventListener("click", () => sendFeedback(answer.request_id, i === 0 ? "correct" : "wrong", i === 0 ? null : r.sku));
    const card = el(
      "li",
      { class: i === 0 ? `result top${answer.match ? " match" : ""}` : "result", "data-sku": r.sku },
      picture,
      el("span", { class: "sku", text: `${i + 1}. ${r.sku}` }),
      el("span", { class: "score", text: `score ${r.score.toFixed(3)}` }),
      el("div", { class: "bar", style: `width: ${Math.max(0, Math.min(1, r.score)) * 100}%` }),
      el("span", { class: "small", text: `${r.shop_id || "no shop"} · ${r.item_id}` }),
      pick,
    );
    list.append(card);
  });
  const none = el("button", { type: "button", id: "none-of-these", text: "none of these" });
  none.addEventListener("click", () => sendFeedback(answer.request_id, "none_of_these", null));
  $("feedback").replaceChildren(el("span", { class: "muted", text: "Feedback (write key): " }), none, el("span", { id: "feedback-status" }));
  const t = answer.timings_ms;
  const stages = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  $("timings").textContent = `${stages} · ${answer.frames_used} frame(s) · gallery v${answer.gallery_version} · model ${answer.model_version}`;
  $("result").hidden = false;
}

// POST /v1/feedback: a verdict on the answer shown (needs a key with the write right when keys are set).
async function sendFeedback(requestId, verdict, sku) {
  try {
    const body = JSON.stringify({ request_id: requestId, verdict, sku });
    const r = await (await api("/v1/feedback", { method: "POST", body, headers: { "Content-Type": "application/json" } })).json();
    $("feedback-status").textContent = ` ${r.verdict}${r.sku ? ` (${r.sku})` : ""} recorded${r.view_item_id ? `, view ${r.view_item_id} added` : ""}`;
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

async function browse() {
  const params = new URLSearchParams({ offset: String(browseOffset), limit: String(PAGE) });
  const sku = $("browse-sku").value.trim();
  const shop = $("browse-shop").value.trim();
  if (sku) params.set("sku", sku);
  if (shop) params.set("shop_id", shop);
  const seq = ++browseSeq;
  const page = await (await api(`/v1/gallery/items?${params}`)).json();
  if (seq !== browseSeq) return;
  const end = Math.min(page.total, page.offset + page.items.length);
  $("browse-count").textContent = page.total ? `${page.offset + 1}–${end} of ${page.total}` : "no items";
  $("prev-page").disabled = page.offset === 0;
  $("next-page").disabled = end >= page.total;
  const list = $("items");
  list.replaceChildren();
  for (const item of page.items) {
    const tryIt = el("button", { type: "button", text: "Try", title: "recognize this item's thumbnail against the whole gallery" });
    tryIt.addEventListener("click", () => guarded(async () => {
      const blob = await (await api(itemPath(item.item_id, item.shop_id, "/thumbnail"))).blob();
      selectTab("recognize");
      const options = { topK: $("try-top-k").value || "5", shop: "", numFrames: "1" }; // this tab's own top k, every shop
      await recognize(new File([blob], `${item.item_id}.jpg`, { type: "image/jpeg" }), true, options);
    }));
    const del = el("button", { type: "button", text: "Delete" });
    del.addEventListener("click", () => guarded(async () => {
      if (del.dataset.armed !== "yes") { // two clicks, no modal dialog
        del.dataset.armed = "yes";
        del.textContent = "Really delete?";
        return;
      }
      await api(itemPath(item.item_id, item.shop_id), { method: "DELETE" });
      forget(item.item_id);
      await Promise.all([browse(), loadInfo()]);
    }));
    const meta = Object.keys(item.metadata).length ? JSON.stringify(item.metadata) : "";
    list.append(el(
      "li",
      { class: "item", "data-sku": item.sku, "data-item": item.item_id },
      thumbnail(item.item_id, item.shop_id),
      el("span", { class: "sku", text: item.sku }),
      el("span", { class: "small", text: `${item.shop_id || "no shop"} · ${item.item_id}` }),
      el("span", { class: "small", text: meta }),
      el("span", {}, tryIt, " ", del),
    ));
  }
}

async function addItem() {
  const form = new FormData();
  form.append("image", $("add-image").files[0]);
  form.append("sku", $("add-sku").value.trim());
  for (const [field, id] of [["shop_id", "add-shop"], ["item_id", "add-item-id"], ["metadata", "add-metadata"]]) {
    const value = $(id).value.trim();
    if (value) form.append(field, value);
  }
  const created = await (await api("/v1/gallery/items", { method: "POST", body: form })).json();
  forget(created.item_id);
  $("add-form").reset();
  $("browse-sku").value = created.sku;
  browseOffset = 0;
  await Promise.all([browse(), loadInfo()]);
}

// A stable colour per SKU, so the same product looks the same all along the strip.
function colour(sku) {
  let h = 0;
  for (const c of sku) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360}, 55%, 45%)`;
}

// answer: {duration_s, segments: [{start_s, end_s, sku, score, item_id, match, alternatives}], ...}
function renderTimeline(answer) {
  const strip = $("strip");
  const list = $("segments");
  strip.replaceChildren();
  list.replaceChildren();
  const duration = answer.duration_s || Math.max(0, ...answer.segments.map((s) => s.end_s)) || 1;
  for (const s of answer.segments) {
    // A segment names its product whenever the timeline found one; below the match threshold it
    // is drawn faded ("weak"), like a recognition answer whose verdict is no match.
    const weak = s.sku && !s.match;
    const label = s.sku ? s.sku : "no match";
    const seg = el("div", {
      class: s.sku ? (weak ? "seg weak" : "seg") : "seg no-match",
      "data-sku": s.sku || "",
      title: `${s.start_s.toFixed(1)}–${s.end_s.toFixed(1)} s: ${label}${s.score != null ? ` (${s.score.toFixed(3)})` : ""}` +
        (weak ? ", below the match threshold" : ""),
      style: `left: ${(100 * s.start_s) / duration}%; width: ${(100 * (s.end_s - s.start_s)) / duration}%;` +
        (s.sku ? ` background: ${colour(s.sku)};` : ""),
      text: label,
    });
    strip.append(seg);
    const alts = (s.alternatives || []).map((a) => `${a.sku} ${a.score.toFixed(2)}`).join(", ");
    list.append(el("li", {
      text: `${s.start_s.toFixed(1)}–${s.end_s.toFixed(1)} s: ${label}` +
        (s.score != null ? ` (${s.score.toFixed(3)})` : "") + (alts ? ` · also ${alts}` : ""),
    }));
  }
  $("strip-axis").replaceChildren(el("span", { text: "0 s" }), el("span", { text: `${duration.toFixed(1)} s` }));
  $("timeline").hidden = false;
}

async function timeline() {
  $("timeline").hidden = true; // the previous strip must not stand under this request's error
  const form = new FormData();
  const file = $("timeline-file").files[0];
  form.append("file", file, file.name);
  const params = new URLSearchParams();
  const shop = $("timeline-shop").value.trim();
  if (shop) params.set("shop_id", shop);
  try {
    renderTimeline(await (await api(`/v1/recognize/timeline?${params}`, { method: "POST", body: form })).json());
  } catch (err) {
    if (err.status === 404 || err.status === 405) throw new Error("this server has no timeline endpoint (POST /v1/recognize/timeline)");
    throw err;
  }
}

async function guarded(action) {
  showError("");
  document.body.classList.add("busy");
  try {
    await action();
  } catch (err) {
    showError(err.message);
  } finally {
    document.body.classList.remove("busy");
  }
}

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== `tab-${name}`;
  if (name === "gallery") guarded(browse);
}

function submit(id, action) {
  $(id).addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(action);
  });
}

function start() {
  $("api-key").value = sessionStorage.getItem("rice-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("rice-api-key", apiKey());
    thumbs.clear();
    loadInfo();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  submit("recognize-form", () => {
    const file = $("query-file").files[0];
    return recognize(file, isImage(file));
  });
  submit("browse-form", () => { browseOffset = 0; return browse(); });
  $("prev-page").addEventListener("click", () => guarded(() => { browseOffset = Math.max(0, browseOffset - PAGE); return browse(); }));
  $("next-page").addEventListener("click", () => guarded(() => { browseOffset += PAGE; return browse(); }));
  submit("add-form", addItem);
  submit("timeline-form", timeline);
  loadInfo();
}

window.riceConsole = { renderRecognition, renderTimeline };
start();
