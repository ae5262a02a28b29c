"""The search page served at ``/``: a search box, a grid of result thumbnails with caption,
class and score, and "more like this" on every result. Plain HTML and JavaScript against the
JSON API (no build step, no external resources: it works on a cluster without internet).
``/?q=<text>`` runs that search on load (links and bookmarks; the browser test uses it)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vcl-dist search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  form { display: flex; gap: .5rem; margin-bottom: .5rem; }
  input[type=search] { flex: 1; font-size: 1.1rem; padding: .4rem .6rem; }
  button { font-size: 1rem; padding: .4rem .9rem; }
  #status { color: #666; margin: .4rem 0 1rem; min-height: 1.2em; }
  #status.error { color: #b00020; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 1rem; }
  .hit { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
  .hit img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #f4f4f4; }
  .caption { font-size: .9rem; margin: .3rem 0; }
  .meta { font-size: .8rem; color: #555; display: flex; justify-content: space-between; }
  .more { font-size: .8rem; }
</style>
</head>
<body>
<h1>vcl-dist search</h1>
<form id="search">
  <input type="search" id="q" name="q" placeholder="describe the image you are looking for" maxlength="1000" autofocus>
  <input type="number" id="k" name="k" value="12" min="1" max="100" style="width:4.5rem" aria-label="results">
  <button type="submit">Search</button>
</form>
<div><label>or search with an image: <input type="file" id="image" accept="image/*"></label></div>
<div id="status"></div>
<div id="results"></div>
<script>
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

function show(data) {
  results.replaceChildren();
  statusLine.className = "";
  statusLine.textContent = `${data.hits.length} results`;
  for (const hit of data.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.rank = hit.rank;
    card.dataset.score = hit.score;
    card.dataset.key = hit.key;
    const img = document.createElement("img");
    img.alt = hit.caption;
    img.addEventListener("load", () => { img.dataset.loaded = "true"; });
    img.src = hit.thumbnail;
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.caption;
    const meta = document.createElement("div");
    meta.className = "meta";
    const cls = document.createElement("span");
    cls.className = "class";
    cls.textContent = hit.class ?? "";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(cls, score);
    const more = document.createElement("a");
    more.className = "more";
    more.href = "#";
    more.textContent = "more like this";
    more.addEventListener("click", (event) => { event.preventDefault(); run(`/similar?key=${encodeURIComponent(hit.key)}&k=${k()}`); });
    card.append(img, caption, meta, more);
    results.append(card);
  }
}

function k() { return document.getElementById("k").value || 12; }

// A server with a token: open the page as /#token=<token>. The fragment never reaches a
// server or its logs; the token stays in this tab's session storage.
const token = (() => {
  const found = new URLSearchParams(location.hash.slice(1)).get("token");
  if (found) {
    sessionStorage.setItem("vcl-dist-token", found);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("vcl-dist-token");
})();

async function run(url, options = {}) {
  statusLine.className = "";
  statusLine.textContent = "searching…";
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(url, { ...options, headers });
    if (response.status === 401) { throw new Error("this server needs its token: open the page as /#token=<token>"); }
    const data = await response.json();
    if (!response.ok) { throw new Error(data.error || response.statusText); }
    show(data);
  } catch (err) {
    results.replaceChildren();
    statusLine.className = "error";
    statusLine.textContent = String(err.message || err);
  }
}

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("q").value.trim();
  if (text) {
    history.replaceState(null, "", `?q=${encodeURIComponent(text)}`);
    run(`/search?text=${encodeURIComponent(text)}&k=${k()}`);
  }
});

document.getElementById("image").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) { run(`/search?k=${k()}`, { method: "POST", body: file }); }
});

const initial = new URLSearchParams(location.search).get("q");
if (initial) {
  document.getElementById("q").value = initial;
  run(`/search?text=${encodeURIComponent(initial)}&k=${k()}`);
}
</script>
</body>
</html>
"""
