// tilerec view: a result's detections over its image in OpenSeadragon. The image comes as Deep Zoom tiles
// (image.dzi), the detections from result.json (the result document as tilerec writes it). The detections are
// drawn on one canvas, a path per label and frame, so tens of thousands stay fluid.
"use strict";
(function () {
  const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                   "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3"];
  const LIST_MAX = 300; // list entries shown; the filters narrow the rest down
  const MIN_SIDE = 3; // px on screen: a detection smaller than this is drawn this size, so it stays visible
  const state = { minScore: 0, search: "", hidden: new Set(), selected: null, hovered: null };
  const api = (window.tilerec = { ready: false, drawn: 0, errors: [] });
  window.addEventListener("error", (event) => api.errors.push(String(event.message)));

  const $ = (id) => document.getElementById(id);

  function record(d, index) {
    const [x, y, w, h] = d.box;
    const text = d.text || "";
    // a face's identity (faces-dnn with identify): shown on the face, and found by the search
    const name = d.data && typeof d.data.identity === "string" ? d.data.identity : "";
    return {
      index, label: d.label, score: d.score, text, name, x, y, w, h, cut: !!d.cut,
      corners: d.obb ? d.obb.corners : null, mask: d.mask || null, keypoints: d.keypoints || null,
      data: d.data || null, words: (text + " " + name + " " + d.label).toLowerCase(),
    };
  }

  function describe(d) {
    const lines = [`${d.label}  ${d.score.toFixed(3)}`];
    if (d.name) lines.push(d.name);
    if (d.text) lines.push(d.text);
    lines.push(`box ${d.x.toFixed(0)}, ${d.y.toFixed(0)}  ${d.w.toFixed(0)}×${d.h.toFixed(0)} px`);
    if (d.data) lines.push(JSON.stringify(d.data));
    if (d.cut) lines.push("cut by a tile edge");
    return lines.join("\n");
  }

  async function start() {
    // the image first: its tiles load while the result is fetched and parsed
    const viewer = OpenSeadragon({
      // the 2-D canvas drawer: WebGL falls back to a slow software renderer where there is no GPU (seen: 8 s to
      // draw the first view in headless Chromium, against 1 s)
      id: "osd", drawer: "canvas", prefixUrl: "openseadragon/images/", tileSources: "image.dzi",
      // no navigator: with this drawer, 6.1.1's draws stray full-resolution tiles over its thumbnail (seen here)
      showNavigator: false,
      // a view's tiles asked for together, not one per frame (OpenSeadragon's default): the server cuts each in ms
      maxTilesPerFrame: 16,
      maxZoomPixelRatio: 8, visibilityRatio: 0.5, animationTime: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
    });
    const canvas = document.createElement("canvas");
    canvas.className = "tilerec-overlay";
    viewer.canvas.appendChild(canvas);
    viewer.addHandler("open-failed", (event) => api.errors.push(`image.dzi: ${event.message}`));

    const response = await fetch("result.json");
    if (!response.ok) throw new Error(`result.json: HTTP ${response.status}`);
    const doc = await response.json();
    const width = doc.image.width;
    const height = doc.image.height;
    const detections = doc.detections.map(record);
    const labels = [...new Set(detections.map((d) => d.label))].sort();
    const colours = new Map(labels.map((label, i) => [label, PALETTE[i % PALETTE.length]]));
    const failed = (doc.failed_tiles || []).map((t) => t.window);
    const skipped = doc.tiling.skipped_tiles || [];
    let shown = detections;

    $("title").textContent = doc.image.source || "tilerec result";
    $("summary").textContent =
      `${width}×${height} px · ${doc.recognizer.name} · ${detections.length} detections · ` +
      `${doc.tiling.tiles} tiles (${failed.length} failed, ${skipped.length} skipped)`;


    function mapping() {
      // image pixels -> viewer element pixels: an offset and one scale (the viewer does not rotate)
      const item = viewer.world.getItemAt(0);
      if (!item) return null;
      const origin = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
      const end = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(width, height));
      return { ox: origin.x, oy: origin.y, s: (end.x - origin.x) / width, item };
    }

    function trace(ctx, d, m) {
      const X = (x) => m.ox + x * m.s;
      const Y = (y) => m.oy + y * m.s;
      if (d.mask && d.w * m.s >= MIN_SIDE) {
        for (const polygon of d.mask) {
          for (const ring of polygon) {
            ctx.moveTo(X(ring[0][0]), Y(ring[0][1]));
            for (let k = 1; k < ring.length; k++) ctx.lineTo(X(ring[k][0]), Y(ring[k][1]));
            ctx.closePath();
          }
        }
      } else if (d.corners && d.w * m.s >= MIN_SIDE) {
        const c = d.corners;
        ctx.moveTo(X(c[0][0]), Y(c[0][1]));
        for (let k = 1; k < c.length; k++) ctx.lineTo(X(c[k][0]), Y(c[k][1]));
        ctx.closePath();
      } else {
        const w = Math.max(MIN_SIDE, d.w * m.s);
        const h = Math.max(MIN_SIDE, d.h * m.s);
        ctx.rect(X(d.x + d.w / 2) - w / 2, Y(d.y + d.h / 2) - h / 2, w, h);
      }
    }

    let drawnAt = "";
    function draw(force = true) {
      const m = mapping();
      if (!m) return;
      const ratio = window.devicePixelRatio || 1;
      const W = viewer.container.clientWidth;
      const H = viewer.container.clientHeight;
      // OpenSeadragon updates every frame while tiles arrive; the overlays change only when the view does
      const at = `${m.ox} ${m.oy} ${m.s} ${W} ${H}`;
      if (!force && at === drawnAt) return;
      drawnAt = at;
      if (canvas.width !== Math.round(W * ratio) || canvas.height !== Math.round(H * ratio)) {
        canvas.width = Math.round(W * ratio);
        canvas.height = Math.round(H * ratio);
        canvas.style.width = `${W}px`;
        canvas.style.height = `${H}px`;
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, W, H);
      const [x0, y0] = [-m.ox / m.s, -m.oy / m.s];
      const [x1, y1] = [(W - m.ox) / m.s, (H - m.oy) / m.s];
      for (const [windows, fill] of [[skipped, "rgba(128,128,128,0.45)"], [failed, "rgba(220,0,0,0.45)"]]) {
        ctx.fillStyle = fill;
        for (const [x, y, w, h] of windows) ctx.fillRect(m.ox + x * m.s, m.oy + y * m.s, w * m.s, h * m.s);
      }
      const byLabel = new Map();
      let drawn = 0;
      for (const d of shown) {
        if (d.x > x1 || d.y > y1 || d.x + d.w < x0 || d.y + d.h < y0) continue;
        drawn++;
        if (!byLabel.has(d.label)) byLabel.set(d.label, []);
        byLabel.get(d.label).push(d);
      }
      ctx.lineWidth = 2;
      for (const [label, group] of byLabel) {
        ctx.beginPath();
        for (const d of group) trace(ctx, d, m);
        ctx.strokeStyle = colours.get(label);
        ctx.fillStyle = colours.get(label) + "40";
        if (group.some((d) => d.mask)) ctx.fill("evenodd");
        ctx.stroke();
        ctx.fillStyle = colours.get(label);
        for (const d of group) {
          if (!d.keypoints || d.w * m.s < 12) continue;
          for (const [x, y, v] of d.keypoints) {
            if (v > 0) ctx.fillRect(m.ox + x * m.s - 2, m.oy + y * m.s - 2, 4, 4);
          }
        }
      }
      // names above the faces large enough on screen to tell apart
      let named = 0;
      ctx.font = "bold 13px sans-serif";
      ctx.lineWidth = 3;
      for (const d of shown) {
        if (!d.name || d.w * m.s < 16 || d.x > x1 || d.y > y1 || d.x + d.w < x0 || d.y + d.h < y0) continue;
        named++;
        const [tx, ty] = [m.ox + d.x * m.s, m.oy + d.y * m.s - 4];
        ctx.strokeStyle = "#000000";
        ctx.strokeText(d.name, tx, ty);
        ctx.fillStyle = "#ffffff";
        ctx.fillText(d.name, tx, ty);
      }
      api.named = named;
      // the hovered one outlined in black under its own colour, the selected one (from the list) in cyan
      for (const [d, colour] of [[state.hovered, null], [state.selected, "#00e5ff"]]) {
        if (!d) continue;
        ctx.beginPath();
        trace(ctx, d, m);
        ctx.lineWidth = 5;
        ctx.strokeStyle = colour || "#000000";
        ctx.stroke();
        if (!colour) {
          ctx.lineWidth = 2;
          ctx.strokeStyle = colours.get(d.label);
          ctx.stroke();
        }
      }
      api.drawn = drawn;
    }

    function zoomTo(d) {
      const m = mapping();
      if (!m) return;
      const pad = Math.max(d.w, d.h) * 1.5 + 16;
      const cx = d.x + d.w / 2;
      const cy = d.y + d.h / 2;
      viewer.viewport.fitBounds(m.item.imageToViewportRectangle(cx - pad, cy - pad, 2 * pad, 2 * pad));
      state.selected = d;
      draw();
    }

    function refresh() {
      shown = detections.filter((d) => !state.hidden.has(d.label) && d.score >= state.minScore &&
                                      (!state.search || d.words.includes(state.search)));
      const counts = new Map();
      for (const d of shown) counts.set(d.label, (counts.get(d.label) || 0) + 1);
      for (const label of labels) $(`count-${labels.indexOf(label)}`).textContent = counts.get(label) || 0;
      $("shown").textContent = `(${shown.length} of ${detections.length})`;
      const list = $("list");
      list.replaceChildren();
      const ranked = [...shown].sort((a, b) => b.score - a.score);
      for (const d of ranked.slice(0, LIST_MAX)) {
        const item = document.createElement("li");
        item.dataset.index = d.index;
        item.title = describe(d);
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colours.get(d.label);
        item.append(swatch, ` ${d.label} ${d.score.toFixed(2)} ${d.name} ${d.text}`);
        item.addEventListener("click", () => zoomTo(d));
        list.append(item);
      }
      if (ranked.length > LIST_MAX) {
        const more = document.createElement("li");
        more.className = "more";
        more.textContent = `${ranked.length - LIST_MAX} more: narrow the filters`;
        list.append(more);
      }
      draw();
    }

    labels.forEach((label, i) => {
      const row = document.createElement("li");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = true;
      box.id = `label-${i}`;
      box.addEventListener("change", () => {
        if (box.checked) state.hidden.delete(label);
        else state.hidden.add(label);
        refresh();
      });
      const name = document.createElement("label");
      name.htmlFor = box.id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colours.get(label);
      name.append(swatch, ` ${label}`);
      const count = document.createElement("span");
      count.className = "count";
      count.id = `count-${i}`;
      row.append(box, name, count);
      $("labels").append(row);
    });
    $("min-score").addEventListener("input", (event) => {
      state.minScore = Number(event.target.value);
      $("min-score-value").textContent = state.minScore.toFixed(2);
      refresh();
    });
    $("search").addEventListener("input", (event) => {
      state.search = event.target.value.trim().toLowerCase();
      refresh();
    });

    const tip = $("tip");
    new OpenSeadragon.MouseTracker({
      element: viewer.container,
      moveHandler: (event) => {
        const m = mapping();
        if (!m) return;
        const x = (event.position.x - m.ox) / m.s;
        const y = (event.position.y - m.oy) / m.s;
        const slack = MIN_SIDE / m.s;
        let best = null;
        for (const d of shown) {
          if (x < d.x - slack || y < d.y - slack || x > d.x + d.w + slack || y > d.y + d.h + slack) continue;
          if (!best || d.w * d.h < best.w * best.h) best = d;
        }
        if (best !== state.hovered) {
          state.hovered = best;
          draw();
        }
        tip.hidden = !best;
        if (best) {
          tip.textContent = describe(best);
          tip.style.left = `${event.originalEvent.clientX + 14}px`;
          tip.style.top = `${event.originalEvent.clientY + 14}px`;
        }
      },
      leaveHandler: () => {
        tip.hidden = true;
        state.hovered = null;
        draw();
      },
    });

    viewer.addHandler("update-viewport", () => draw(false));
    viewer.addHandler("resize", () => draw(false));
    const opened = () => {
      refresh();
      api.ready = true;
    };
    if (viewer.world.getItemCount() > 0) opened();
    else viewer.addHandler("open", opened);
    Object.assign(api, {
      viewer,
      total: detections.length,
      shown: () => shown.length,
      redraw: draw,
      fullyLoaded: () => !!viewer.world.getItemAt(0) && viewer.world.getItemAt(0).getFullyLoaded(),
      toElement: (x, y) => {
        const m = mapping();
        return [m.ox + x * m.s, m.oy + y * m.s];
      },
      centre: () => {
        const m = mapping();
        const c = viewer.viewport.getCenter(true);
        const p = m.item.viewportToImageCoordinates(c);
        return [p.x, p.y];
      },
    });
  }

  start().catch((error) => {
    api.errors.push(String(error));
    $("summary").textContent = `Could not load the result: ${error}`;
    console.error(error);
  });
})();
