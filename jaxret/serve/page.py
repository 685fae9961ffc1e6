"""The search page: one HTML document with its style and script inline, so it works with no network beyond the
server (no CDN, no fonts, no framework). A person drops or picks a photo; the page posts it to `/search` and
shows the query beside a grid of results with their distances, without reloading.
"""

import html
import json

from data_prep import inshop_features
from jaxret.serve import uploads

_STYLE = """
:root { color-scheme: light; --accent: #1f6feb; --muted: #57606a; --line: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       background: #f6f8fa; }
header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { margin: 0; font-size: 20px; }
#about { margin: 2px 0 0; color: var(--muted); font-size: 13px; }
main { display: grid; grid-template-columns: 280px 1fr; gap: 24px; padding: 24px; align-items: start; }
#drop { position: relative; display: flex; flex-direction: column; align-items: center; justify-content: center;
        width: 280px; height: 280px; border: 2px dashed var(--line); border-radius: 10px; background: #fff;
        color: var(--muted); text-align: center; cursor: pointer; overflow: hidden; }
#drop.over { border-color: var(--accent); background: #eef5ff; }
#drop input { position: absolute; inset: 0; opacity: 0; cursor: pointer; }
#query { width: 100%; height: 100%; object-fit: contain; image-rendering: auto; }
#drop.chosen #drop-text { display: none; }
.options { margin-top: 14px; display: grid; gap: 10px; }
.options label { display: flex; justify-content: space-between; align-items: center; gap: 8px; }
.options input, .options select { font: inherit; padding: 3px 6px; max-width: 170px; }
#status { min-height: 1.4em; margin: 4px 0 0; }
#status.error { color: #cf222e; }
#timings { color: var(--muted); font-size: 12px; margin: 0; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 14px; }
.hit { margin: 0; padding: 8px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
       font-size: 12px; }
.hit img { display: block; width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px;
           background: #eaeef2; }
.hit figcaption { margin-top: 6px; }
.hit .rank { font-weight: 600; }
.hit .distance { float: right; font-variant-numeric: tabular-nums; }
.hit .name { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.empty { color: var(--muted); }
"""

_SCRIPT = """
const $ = (id) => document.getElementById(id);
let photo = null;
let latest = 0;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function describeCatalogue() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    if (!response.ok) { setStatus(health.detail || "The catalogue is not available.", true); return; }
    const c = health.collection, m = health.model;
    $("about").textContent = `${c.rows.toLocaleString()} catalogue images in ${c.name} (${c.index}, ${c.metric})` +
        ` · ${m.name} at step ${m.step} · fingerprint ${m.fingerprint}`;
  } catch (error) {
    setStatus("The server did not answer: " + error, true);
  }
}

function choose(file) {
  if (!file) return;
  photo = file;
  const query = $("query");
  if (query.src) URL.revokeObjectURL(query.src);
  query.src = URL.createObjectURL(file);
  query.hidden = false;
  $("drop").classList.add("chosen");
  search();
}

function hitCard(hit) {
  const card = document.createElement("figure");
  card.className = "hit";
  card.dataset.rank = hit.rank;
  card.dataset.itemId = hit.item_id;
  card.dataset.image = hit.image;
  const picture = document.createElement("img");
  picture.src = hit.thumbnail_url;
  picture.alt = `result ${hit.rank}: ${hit.image}`;
  picture.loading = "lazy";
  const caption = document.createElement("figcaption");
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const distance = document.createElement("span");
  distance.className = "distance";
  distance.textContent = `d = ${hit.distance.toFixed(4)}`;
  distance.title = "distance to the query (smaller is closer)";
  const item = document.createElement("div");
  item.textContent = `item ${hit.item_id >= 0 ? hit.item_id : "-"} · ${hit.category_name}`;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = hit.image;
  name.title = hit.image;
  caption.append(rank, distance, item, name);
  card.append(picture, caption);
  return card;
}

async function search() {
  if (!photo) return;
  const request = ++latest;
  if (photo.size > LIMITS.max_bytes) {  // The server would refuse it too (413); say so before uploading.
    $("results").replaceChildren();
    $("results").dataset.state = "error";
    setStatus(`The photo has ${photo.size.toLocaleString()} bytes; up to ${LIMITS.max_bytes.toLocaleString()} ` +
              "are accepted.", true);
    return;
  }
  const form = new FormData();
  form.append("image", photo);
  form.append("k", $("k").value);
  form.append("category", $("category").value);
  $("results").dataset.state = "searching";
  setStatus("Searching…");
  let response, answer;
  try {
    response = await fetch("/search", {method: "POST", body: form});
    answer = await response.json();
  } catch (error) {
    if (request !== latest) return;
    $("results").dataset.state = "error";
    setStatus("The server did not answer: " + error, true);
    return;
  }
  if (request !== latest) return;  // A newer search replaced this one.
  if (!response.ok) {
    $("results").replaceChildren();
    $("results").dataset.state = "error";
    setStatus(answer.detail || response.statusText, true);
    $("timings").textContent = "";
    return;
  }
  const cards = answer.hits.map(hitCard);
  if (!cards.length) {
    const none = document.createElement("p");
    none.className = "empty";
    none.textContent = "No catalogue image matches this filter.";
    cards.push(none);
  }
  $("results").replaceChildren(...cards);
  $("results").dataset.state = "done";
  setStatus(`The ${answer.hits.length} nearest catalogue images` +
            (answer.category ? ` in ${answer.category}` : "") + ", nearest first.");
  const t = answer.timings_ms;
  $("timings").textContent = `decode ${t.decode.toFixed(1)} ms · queue ${t.queue.toFixed(1)} ms · ` +
      `embed ${t.embed.toFixed(1)} ms · search ${t.search.toFixed(1)} ms · batch of ${answer.batch_size}`;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  choose(event.dataTransfer.files[0]);
});
$("k").addEventListener("change", search);
$("category").addEventListener("change", search);
describeCatalogue();
"""


def render(limits: uploads.Limits) -> str:
  """The page's HTML for a server with these limits (k range, categories of the filter)."""
  options = "".join(f"<option value=\"{html.escape(name)}\">{html.escape(name)}</option>"
                    for name in inshop_features.CATEGORY_NAMES)
  return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxret visual search</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header>
  <h1>jaxret visual search</h1>
  <p id="about">Loading the catalogue…</p>
</header>
<main>
  <section>
    <label id="drop" for="file">
      <input type="file" id="file" accept="image/*" aria-label="query photo">
      <img id="query" alt="query photo" hidden>
      <span id="drop-text">Drop a photo here,<br>or click to pick one</span>
    </label>
    <div class="options">
      <label>Results <input type="number" id="k" min="1" max="{limits.max_k}" value="{limits.default_k}"></label>
      <label>Category <select id="category"><option value="">any</option>{options}</select></label>
      <p id="status" role="status"></p>
      <p id="timings"></p>
    </div>
  </section>
  <section id="results" aria-live="polite" data-state="empty"></section>
</main>
<script>
const LIMITS = {json.dumps({"max_bytes": limits.max_bytes, "max_k": limits.max_k})};
{_SCRIPT}</script>
</body>
</html>
"""
