// fs view: the three pages. Page state lives in the URL (?where=, ?tile=, ?layers=...) so a view can be shared
// or reloaded; every request goes to the read-only JSON endpoints, and their one-line errors are shown as-is.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const params = () => new URLSearchParams(location.search);
const STANDARD = new Set(["rank", "score", "slide_id", "tile_id", "tile_index", "x", "y", "name", "pixels",
  "n_tiles"]);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node && k !== "list") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function getJSON(url, init) {
  const r = await fetch(url, init);
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function showError(err) {
  const box = $("#error");
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

function clearError() { $("#error").hidden = true; }

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number" && !Number.isInteger(v)) return v.toPrecision(4);
  if (Array.isArray(v)) return v.join(", ");
  return String(v);
}

// Label columns of a hit; one that only repeats the slide's file name (the labels CSV's key) is left out.
function labelText(row) {
  return Object.entries(row).filter(([k, v]) => !STANDARD.has(k) && v !== row.name)
    .map(([k, v]) => `${k}=${fmt(v)}`).join(" ");
}

// --- search results, shared by the search page and the slide page's neighbours --------------------------------

function tileFigure(hit, extraClass = "") {
  const fig = el("figure", { className: `hit ${extraClass}`.trim(), dataset: { tileId: hit.tile_id } });
  if (hit.pixels && hit.pixels !== "ok") fig.append(el("div", { className: "missing" }, hit.pixels));
  else fig.append(el("img", { src: `/tiles/${hit.tile_id}.jpeg`, alt: `tile ${hit.tile_id}`, loading: "lazy" }));
  const link = el("a", { href: `/slide/${hit.slide_id}?tile=${hit.tile_id}` }, hit.name || hit.slide_id.slice(0, 12));
  if (extraClass === "query") fig.append(el("figcaption", {}, el("b", {}, "query "), link));
  else fig.append(el("figcaption", {}, el("b", {}, `#${hit.rank} `), `${hit.score.toFixed(3)} `, link,
    el("br"), labelText(hit)));
  return fig;
}

function renderHits(container, body) {
  container.replaceChildren();
  if (body.level === "slides") {
    const table = el("table", { className: "data", id: "slide-hits" });
    table.append(el("tr", {}, ...["rank", "score", "slide", "tiles", "labels"].map((h) => el("th", {}, h))));
    for (const h of body.hits) {
      table.append(el("tr", { className: "hit", dataset: { slideId: h.slide_id } },
        el("td", { className: "num" }, h.rank), el("td", { className: "num" }, h.score.toFixed(3)),
        el("td", {}, el("a", { href: `/slide/${h.slide_id}` }, h.name)), el("td", { className: "num" }, h.n_tiles),
        el("td", {}, labelText(h))));
    }
    container.append(table);
    return;
  }
  for (const h of body.hits) container.append(tileFigure(h));
}

async function loadSets(select, tilingId) {
  const body = await getJSON("/api/sets");
  select.replaceChildren();
  for (const s of body.sets) {
    if (tilingId && s.tiling_id !== tilingId) continue;
    const note = s.index === "fresh" ? "" : ` (index ${s.index})`;
    select.append(el("option", { value: s.model }, `${s.model}${note}`));
  }
  return body;
}

// --- cohort ----------------------------------------------------------------------------------------------------

async function cohortPage() {
  const where = params().get("where") || "";
  $("#where").value = where;
  $("#filter").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if ($("#where").value.trim()) q.set("where", $("#where").value.trim());
    location.search = q.toString();
  });
  let body;
  try {
    body = await getJSON(`/api/cohort?${new URLSearchParams({ where })}`);
  } catch (err) {
    showError(err);
    return;
  }
  const columns = [["name", "slide"], ...body.label_columns.map((c) => [`labels.${c}`, c]), ["tiles", "tiles"],
    ["embedding_sets", "embedding sets"], ["failures", "failures"], ["file_present", "file"]];
  const value = (row, key) => key.startsWith("labels.") ? row.labels[key.slice(7)]
    : key === "failures" ? row.failures.length : row[key];
  const state = { key: "name", dir: "asc" };
  const head = el("tr");
  for (const [key, title] of columns) {
    const th = el("th", { dataset: { key } }, title);
    th.addEventListener("click", () => {
      state.dir = state.key === key && state.dir === "asc" ? "desc" : "asc";
      state.key = key;
      draw();
    });
    head.append(th);
  }
  $("#cohort thead").append(head);
  $("#count").textContent = `${body.slides.length} of ${body.total} slides`;

  function draw() {
    const rows = [...body.slides].sort((a, b) => {
      const x = value(a, state.key), y = value(b, state.key);
      const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1
        : x < y ? -1 : 1;
      return state.dir === "asc" ? order : -order;
    });
    for (const th of head.children) th.dataset.dir = th.dataset.key === state.key ? state.dir : "";
    const tbody = $("#cohort tbody");
    tbody.replaceChildren();
    for (const r of rows) {
      const cells = columns.map(([key]) => {
        const v = value(r, key);
        if (key === "name") return el("td", {}, el("a", { href: `/slide/${r.slide_id}` }, r.name));
        if (key === "failures") return el("td", { className: v ? "bad" : "", title: r.failures.join("\n") }, v || "");
        if (key === "file_present") return el("td", { className: v ? "" : "bad" }, v ? "ok" : "file gone");
        return el("td", { className: typeof v === "number" ? "num" : "" }, fmt(v));
      });
      tbody.append(el("tr", { className: "slide-row", dataset: { slideId: r.slide_id } }, ...cells));
    }
  }
  draw();
  if (body.unregistered_failures.length) {
    $("#unregistered").hidden = false;
    for (const f of body.unregistered_failures) $("#unregistered ul").append(el("li", {}, `${f.path} (${f.stage}): ${f.message}`));
  }
}

// --- slide -----------------------------------------------------------------------------------------------------

async function slidePage() {
  const slideId = decodeURIComponent(location.pathname.split("/").pop());
  const q = params();
  let info;
  try {
    info = await getJSON(`/api/slides/${encodeURIComponent(slideId)}`);
  } catch (err) {
    showError(err);
    return;
  }
  document.title = `${info.name} · fs view`;
  $("#title").textContent = info.name;
  $("#meta").textContent = `${info.width} × ${info.height} px at ${info.mpp.toFixed(3)} µm/px · ${info.vendor}` +
    ` · ${info.sets.map((s) => s.model).join(", ") || "no embeddings"}`;
  $("#labels").textContent = Object.entries(info.labels).map(([k, v]) => `${k}=${fmt(v)}`).join("  ");
  if (info.failures.length) showError(info.failures.map((f) => `${f.stage}: ${f.message}`).join("; "));
  for (const t of info.tilings) {
    $("#tiling").append(el("option", { value: t.tiling_id },
      `${t.tile_size} px @ ${t.target_mpp} µm/px (${t.n_tiles} tiles${t.pixels ? ", pixels cached" : ""})`));
  }
  if (q.get("tiling")) $("#tiling").value = q.get("tiling");
  for (const c of info.quality) $("#layer-quality").append(el("option", { value: c }, c.replace("_", " ")));
  for (const r of info.runs) $("#layer-attention").append(el("option", { value: r }, r));
  for (const c of info.annotations) $("#layer-annotation").append(el("option", { value: c }, c));

  const tilingId = () => $("#tiling").value;
  let tiles = { tiles: [], footprint: 1 };
  const loadTiles = async () => {
    if (!tilingId()) return;
    tiles = await getJSON(`/api/slides/${slideId}/tiles?tiling=${encodeURIComponent(tilingId())}`);
    await loadSets($("#model"), tilingId());
    const wanted = q.get("model");
    if (wanted && [...$("#model").options].some((o) => o.value === wanted)) $("#model").value = wanted;
    similar();
  };
  // Slide-level search (pooled vectors) with the embedding set chosen for neighbours.
  const similar = () => {
    const link = $("#similar-slides");
    link.hidden = !$("#model").value;
    link.href = `/search?${new URLSearchParams({ model: $("#model").value, slide: slideId })}`;
  };
  $("#model").addEventListener("change", similar);

  let viewer = null;
  if (!info.file_present) {
    const gone = $("#file-gone");
    gone.hidden = false;
    gone.textContent = `The slide file ${info.name} is gone (moved or deleted); its tiles and embeddings are ` +
      "still in the store, and neighbours below still work.";
    $("#osd").hidden = true;
  } else {
    viewer = OpenSeadragon({
      id: "osd", prefixUrl: "/static/openseadragon/images/", tileSources: `/dz/${slideId}.dzi`,
      drawer: "canvas", showNavigator: true, crossOriginPolicy: false,
      gestureSettingsMouse: { clickToZoom: false },
    });
    let drawn = 0;
    viewer.addHandler("tile-loaded", () => {
      drawn += 1;
      $("#tiles-loaded").textContent = drawn;
      $("#tiles-loaded").dataset.count = drawn;
    });
    viewer.addHandler("open-failed", (e) => showError(`deep zoom: ${e.message}`));
    viewer.addHandler("canvas-click", (e) => {
      if (!e.quick || !tiles.tiles.length) return;
      const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(e.position);
      const fp = tiles.footprint;
      const hit = tiles.tiles.find((t) => p.x >= t.x && p.x < t.x + fp && p.y >= t.y && p.y < t.y + fp);
      if (hit) neighbours(hit);
    });
  }

  // Overlays are fetched first so a server refusal shows its one-line reason; the PNG then becomes a layer.
  const layers = {};
  async function setLayer(name, path) {
    const item = $(`#layers li[data-layer="${name}"]`);
    const state = $(".state", item);
    if (layers[name]) {
      viewer.world.removeItem(layers[name]);
      delete layers[name];
    }
    item.dataset.state = "off";
    state.textContent = "";
    state.classList.remove("failed");
    if (!path || !viewer) return;
    item.dataset.state = "loading";
    state.textContent = "loading…";
    const r = await fetch(path);
    if (!r.ok) {
      const body = await r.json().catch(() => ({ error: r.statusText }));
      item.dataset.state = "failed";
      state.textContent = body.error;
      state.classList.add("failed");
      return;
    }
    const url = URL.createObjectURL(await r.blob());
    await new Promise((done) => viewer.addTiledImage({
      tileSource: { type: "image", url }, x: 0, y: 0, width: 1, opacity: Number($("#opacity").value),
      success: (e) => { layers[name] = e.item; item.dataset.state = "loaded"; state.textContent = "shown"; done(); },
      error: (e) => { item.dataset.state = "failed"; state.textContent = e.message; done(); },
    }));
  }
  const overlayPath = (layer, extra = {}) =>
    `/overlay/${slideId}/${layer}.png?${new URLSearchParams({ tiling: tilingId(), ...extra })}`;
  const refresh = {
    tissue: () => setLayer("tissue", $("#layer-tissue").checked ? overlayPath("tissue") : null),
    grid: () => setLayer("grid", $("#layer-grid").checked ? overlayPath("grid") : null),
    quality: () => setLayer("quality", $("#layer-quality").value ? overlayPath($("#layer-quality").value) : null),
    attention: () => setLayer("attention",
      $("#layer-attention").value ? overlayPath("attention", { run: $("#layer-attention").value }) : null),
    annotation: () => setLayer("annotation",
      $("#layer-annotation").value ? overlayPath("annotation", { class: $("#layer-annotation").value }) : null),
  };
  $("#layer-tissue").addEventListener("change", refresh.tissue);
  $("#layer-grid").addEventListener("change", refresh.grid);
  $("#layer-quality").addEventListener("change", refresh.quality);
  $("#layer-attention").addEventListener("change", refresh.attention);
  $("#layer-annotation").addEventListener("change", refresh.annotation);
  $("#opacity").addEventListener("input", () => {
    for (const item of Object.values(layers)) item.setOpacity(Number($("#opacity").value));
  });
  $("#tiling").addEventListener("change", async () => {
    await loadTiles();
    await Promise.all(Object.values(refresh).map((f) => f()));
  });

  let marker = null;
  async function neighbours(tile) {
    if (viewer && viewer.world.getItemCount()) {
      const rect = viewer.world.getItemAt(0).imageToViewportRectangle(tile.x, tile.y, tiles.footprint,
        tiles.footprint);
      if (marker) viewer.removeOverlay(marker);
      marker = el("div", { className: "selected-tile", id: "selected-tile", dataset: { tileId: tile.tile_id } });
      viewer.addOverlay({ element: marker, location: rect });
    }
    const box = $("#neighbours");
    box.replaceChildren(el("p", { className: "muted" }, "searching…"));
    $("#query").replaceChildren(tileFigure({ tile_id: tile.tile_id, slide_id: slideId, name: info.name, rank: 0,
      score: 1, pixels: "ok" }, "query"));
    if (!$("#model").value) {
      box.replaceChildren(el("p", { className: "error" }, "no embedding set on this tiling"));
      return;
    }
    try {
      renderHits(box, await getJSON(`/api/search?${new URLSearchParams({ model: $("#model").value,
        tile: tile.tile_id, k: "12" })}`));
      box.append(el("a", { href: `/search?${new URLSearchParams({ model: $("#model").value, tile: tile.tile_id })}` },
        "open in search"));
    } catch (err) {
      box.replaceChildren(el("p", { className: "error" }, err.message));
    }
  }

  try {
    await loadTiles();
  } catch (err) {
    showError(err);
  }
  const wanted = (q.get("layers") || "").split(",").filter(Boolean);
  if (wanted.includes("tissue")) $("#layer-tissue").checked = true;
  if (wanted.includes("grid")) $("#layer-grid").checked = true;
  if (q.get("quality")) $("#layer-quality").value = q.get("quality");
  if (q.get("run")) $("#layer-attention").value = q.get("run");
  if (q.get("annotation")) $("#layer-annotation").value = q.get("annotation");
  const start = () => Promise.all(Object.values(refresh).map((f) => f()));
  if (viewer) {
    if (viewer.world.getItemCount()) await start();
    else await new Promise((done) => viewer.addOnceHandler("open", () => start().then(done)));
  }
  const tileId = q.get("tile");
  if (tileId) {
    const tile = tiles.tiles.find((t) => t.tile_id === tileId);
    if (tile) await neighbours(tile);
    else showError(`tile ${tileId} is not a tile of this slide's tiling`);
  }
  document.body.dataset.ready = "true";
}

// --- search ----------------------------------------------------------------------------------------------------

async function searchPage() {
  const q = params();
  for (const name of ["tile", "slide", "k", "where"]) if (q.get(name)) $(`#${name}`).value = q.get(name);
  $("#group").checked = q.get("group_by") === "slide";
  try {
    await loadSets($("#model"));
  } catch (err) {
    showError(err);
  }
  if (q.get("model")) $("#model").value = q.get("model");

  async function run(body) {
    clearError();
    $("#summary").textContent = "searching…";
    try {
      const result = await body();
      renderHits($("#results"), result);
      $("#summary").textContent = `${result.hits.length} ${result.level} by cosine similarity in ${$("#model").value}`
        + ($("#where").value ? ` where ${$("#where").value}` : "");
    } catch (err) {
      $("#summary").textContent = "";
      $("#results").replaceChildren();
      showError(err);
    }
  }

  $("#search").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("#image").files[0];
    if (file) {
      const form = new FormData();
      form.set("image", file);
      for (const name of ["model", "k", "where"]) form.set(name, $(`#${name}`).value);
      $("#query").replaceChildren(el("figure", { className: "hit query" },
        el("img", { src: URL.createObjectURL(file), alt: file.name }), el("figcaption", {}, file.name)));
      run(() => getJSON("/api/search/image", { method: "POST", body: form }));
      return;
    }
    const next = new URLSearchParams({ model: $("#model").value, k: $("#k").value });
    for (const name of ["tile", "slide", "where"]) if ($(`#${name}`).value.trim()) next.set(name, $(`#${name}`).value.trim());
    if ($("#group").checked) next.set("group_by", "slide");
    location.search = next.toString();
  });

  if (q.get("model") && (q.get("tile") || q.get("slide"))) {
    if (q.get("tile")) {
      $("#query").replaceChildren(el("figure", { className: "hit query", dataset: { tileId: q.get("tile") } },
        el("img", { src: `/tiles/${q.get("tile")}.jpeg`, alt: "query tile" }), el("figcaption", {}, "query tile")));
    }
    const query = new URLSearchParams([...q].filter(([k]) => ["model", "tile", "slide", "k", "where", "group_by"].includes(k)));
    await run(() => getJSON(`/api/search?${query}`));
  }
  document.body.dataset.ready = "true";
}

const pages = { cohort: cohortPage, slide: slidePage, search: searchPage };
pages[document.body.dataset.page]().catch(showError).finally(() => { document.body.dataset.ready = "true"; });
