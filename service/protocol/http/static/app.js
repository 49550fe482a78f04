"use strict";
// graft's page to try a model. It calls the public HTTP API only, with paths relative to the
// page (so it works behind a path prefix): GET v1/models/{name} for the versions, POST classify
// and POST explain with the chosen files, and GET models when a management token is given.
// A field or route the server lacks (an older graft, an older export) is said, never guessed.

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { files: [], run: 0, urls: [] };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // An answer that is not 2xx, as the server explained it: graft's {"error", "message"}, the
  // V2 protocol's {"error"}, or the start of whatever else came (e.g. a proxy's page).
  async function apiError(response) {
    const text = await response.text().catch(() => "");
    let code = "";
    let message = "";
    try {
      const body = JSON.parse(text);
      code = typeof body.error === "string" ? body.error : "";
      message = typeof body.message === "string" ? body.message : code;
    } catch {
      message = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
    }
    if (!message) message = `the server answered ${response.status} ${response.statusText}`;
    return new ApiError(response.status, code, message);
  }

  async function call(path, init) {
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "unreachable", `the server could not be reached (${err.message})`);
    }
    if (!response.ok) throw await apiError(response);
    try {
      return await response.json();
    } catch (err) {
      throw new ApiError(response.status, "bad_answer", `the answer is not JSON (${err.message})`);
    }
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function percent(score) {
    return typeof score === "number" ? `${(score * 100).toFixed(1)} %` : "?";
  }

  // -- the controls ---------------------------------------------------------------------------

  function note(text) {
    $("model-note").textContent = text;
  }

  async function loadVersions() {
    const select = $("version");
    select.replaceChildren(new Option("newest served", ""));
    const name = $("model").value.trim();
    if (!name) {
      note("");
      return;
    }
    try {
      const status = await call(`v1/models/${encodeURIComponent(name)}`);
      const versions = [...status.model_version_status].sort((a, b) => b.version - a.version);
      for (const v of versions) {
        const option = new Option(`${v.version} (${String(v.state).toLowerCase()})`, v.version);
        option.disabled = v.state !== "AVAILABLE";
        select.append(option);
      }
      note(`${name}: ${versions.length} version(s)`);
    } catch (err) {
      note(err.message);
    }
  }

  async function listModels() {
    const token = $("token").value.trim();
    if (!token) {
      note("enter the server's GRAFT_ADMIN_TOKEN first");
      return;
    }
    try {
      const answer = await call("models", { headers: { authorization: `Bearer ${token}` } });
      const names = answer.models.map((m) => m.name);
      $("model-names").replaceChildren(...names.map((n) => new Option(n, n)));
      note(names.length ? `models: ${names.join(", ")}` : "the repository holds no model");
    } catch (err) {
      note(err.message);
    }
  }

  function requestBody(files) {
    const form = new FormData();
    for (const file of files) form.append("images", file, file.name);
    const model = $("model").value.trim();
    if (model) form.append("model", model);
    if ($("version").value) form.append("version", $("version").value);
    if ($("top-k").value.trim()) form.append("top_k", $("top-k").value.trim());
    return form;
  }

  // -- a run: classify, and explain beside it -------------------------------------------------

  function showError(err) {
    $("error-message").textContent = err.message || String(err);
    const detail = err.status ? `HTTP ${err.status}${err.code ? ` · ${err.code}` : ""}` : "";
    $("error-detail").textContent = detail;
    $("error").hidden = false;
  }

  async function run(files) {
    const ticket = ++state.run; // a newer run's answer replaces an older one's
    state.files = files;
    $("again").disabled = false;
    $("error").hidden = true;
    $("answer").hidden = true;
    $("results").replaceChildren();
    $("status").textContent = `Classifying ${files.length} image(s)…`;
    const started = performance.now();
    // Both requests go at once; the heatmaps are attached when the classification is shown.
    const explained = $("explain").checked
      ? call("explain", { method: "POST", body: requestBody(files) }).then(
          (answer) => ({ answer }),
          (error) => ({ error }),
        )
      : null;
    let answer;
    try {
      answer = await call("classify", { method: "POST", body: requestBody(files) });
    } catch (err) {
      if (ticket !== state.run) return;
      $("status").textContent = "";
      showError(err);
      return;
    }
    if (ticket !== state.run) return;
    const ms = Math.round(performance.now() - started);
    $("status").textContent = `${files.length} image(s) classified in ${ms} ms`;
    const cards = render(answer, files);
    if (explained === null) {
      for (const card of cards) heatmapNote(card, "Heatmap off.");
      return;
    }
    const outcome = await explained;
    if (ticket === state.run) attachHeatmaps(outcome, cards, files);
  }

  function render(answer, files) {
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = files.map((file) => URL.createObjectURL(file));
    $("answer-title").textContent = `${answer.model}, version ${answer.version}`;
    const cards = answer.results.map((result, i) => card(result, files[i], state.urls[i]));
    $("results").replaceChildren(...cards);
    $("answer").hidden = false;
    return cards;
  }

  function card(result, file, url) {
    const item = element("li", "card");
    const figure = element("figure", "thumb");
    const image = element("img");
    image.src = url;
    image.alt = file.name;
    figure.append(image, element("figcaption", "", file.name));
    const verdict = element("p", "verdict");
    verdict.append(element("strong", "label", result.label), " ", percent(result.score));
    const bars = element("ol", "bars");
    for (const top of result.top_k || []) bars.append(bar(top));
    const heatmap = element("div", "heatmap");
    heatmap.append(element("p", "note", "Computing the heatmap…"));
    item.append(figure, verdict, distribution(result), bars, heatmap);
    return item;
  }

  function bar(top) {
    const row = element("li", "bar");
    const track = element("span", "track");
    const fill = element("span", "fill");
    fill.style.width = `${Math.max(0, Math.min(1, top.score)) * 100}%`; // CSSOM: allowed by CSP
    track.append(fill);
    const value = element("span", "value", percent(top.score));
    row.append(element("span", "name", top.label), track, value);
    return row;
  }

  // The in-distribution flag: absent or null in versions exported without an OOD check.
  function distribution(result) {
    const ood = result.ood_score;
    const score = typeof ood === "number" ? ` (score ${ood.toPrecision(3)})` : "";
    if (result.in_distribution === true) return element("p", "ood in", `in distribution${score}`);
    if (result.in_distribution === false) {
      return element("p", "ood out", `unlike the training images${score}`);
    }
    return element("p", "ood none", "no in-distribution check in this version");
  }

  function heatmapNote(card, text) {
    card.querySelector(".heatmap").replaceChildren(element("p", "note", text));
  }

  function attachHeatmaps(outcome, cards, files) {
    if (outcome.error) {
      const err = outcome.error;
      // An older graft has no /explain at all; an older export, no explanations (its message).
      const missing = err.status === 404 || err.status === 405;
      const noRoute = missing && /route|not served/.test(err.message);
      const text = noRoute
        ? "This server has no POST /explain: no heatmaps."
        : `No heatmap: ${err.message}`;
      for (const card of cards) heatmapNote(card, text);
      return;
    }
    const explanations = outcome.answer.explanations || [];
    cards.forEach((card, i) => {
      const png = explanations[i] && (explanations[i].overlay_png || explanations[i].heatmap_png);
      if (typeof png !== "string" || !png) {
        heatmapNote(card, "The answer has no heatmap for this image.");
        return;
      }
      const image = element("img", "heatmap-image");
      image.alt = `Grad-CAM heatmap of ${files[i].name}`;
      image.src = `data:image/png;base64,${png}`;
      card.querySelector(".heatmap").replaceChildren(image);
    });
  }

  // -- wiring -----------------------------------------------------------------------------------

  function chosen(list, empty) {
    const files = [...(list || [])];
    if (files.length) run(files);
    else if (empty) showError(new ApiError(0, "", empty));
  }

  function wire() {
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const files = event.dataTransfer && event.dataTransfer.files;
      chosen(files, "no file came with the drop; drop image files");
    });
    // A file dropped beside the zone must not make the browser leave the page to show it.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (event) => event.preventDefault());
    }
    $("files").addEventListener("change", (event) => {
      chosen(event.target.files, ""); // none: the choice was cancelled
      event.target.value = ""; // the same file chosen again is a new run
    });
    $("again").addEventListener("click", () => state.files.length && run(state.files));
    $("model").addEventListener("change", loadVersions);
    $("list-models").addEventListener("click", listModels);
    $("controls").addEventListener("submit", (event) => {
      event.preventDefault();
      if (state.files.length) run(state.files);
    });
    document.body.dataset.ready = "true"; // for tests: the handlers are in place
  }

  wire();
})();
