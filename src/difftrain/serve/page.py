"""The web page at `/`: one self-contained HTML file (no build step, no CDN: it works offline).

It speaks the server's own API: the lists from `/sdapi/v1/*`, each generation a job on
`/v1/jobs` polled for its progress, so the page and any other client wait in the same queue.
Up to three ControlNet units (model, preprocessor, weight, control image: the extension's default
number of units) are sent as A1111's ControlNet extension takes them, in `alwayson_scripts`. Its
img2img tab takes an uploaded image or a generated one ("Send to img2img") and a mask painted on it
with the mouse: white strokes on a canvas of the image's own size (the eraser takes them off again),
sent as a black and white PNG (what A1111's API takes), so a stroke lands on the same pixels however
the image is shown.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>difftrain</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 0; display: flex; min-height: 100vh; color: #222; }
  form { width: 320px; padding: 16px; background: #f4f4f6; box-sizing: border-box; }
  label { display: block; margin: 8px 0 2px; font-weight: 600; }
  .unit { font-size: 12px; color: #666; margin: 4px 0 2px; }
  input, select, textarea, button { width: 100%; box-sizing: border-box; font: inherit; padding: 4px; }
  input[type=checkbox] { width: auto; margin: 8px 0; }
  .row { display: flex; gap: 8px; } .row > div { flex: 1; }
  button { margin-top: 12px; padding: 8px; font-weight: 600; }
  main { flex: 1; padding: 16px; }
  progress { width: 100%; height: 14px; }
  #status { margin: 6px 0; color: #555; min-height: 1.2em; }
  #gallery { display: flex; flex-wrap: wrap; gap: 12px; }
  figure { margin: 0; width: 260px; border: 1px solid #ddd; padding: 6px; background: #fff; }
  figure img { width: 100%; image-rendering: pixelated; }
  figcaption { font-size: 11px; white-space: pre-wrap; word-break: break-word; color: #444; }
  figure a, figure button { font-size: 12px; margin-right: 8px; width: auto; padding: 2px 6px; }
  .tabs { display: flex; gap: 4px; } .tabs button { margin: 0 0 8px; }
  .tabs button.active { background: #333; color: #fff; }
  body[data-mode=img2img] .txt2img-only, body[data-mode=txt2img] .img2img-only { display: none; }
  #sketch { position: relative; display: inline-block; margin: 8px 0; line-height: 0; background: #eee; }
  #sketch img, #sketch canvas { width: 384px; image-rendering: pixelated; }
  #mask { position: absolute; left: 0; top: 0; opacity: 0.55; cursor: crosshair; touch-action: none; }
  #img2img .row { max-width: 640px; align-items: end; }
</style>
</head>
<body data-mode="txt2img">
<form id="form" novalidate>
  <div class="tabs"><button type="button" id="tab_txt2img" class="active">txt2img</button>
    <button type="button" id="tab_img2img">img2img</button></div>
  <label for="prompt">Prompt</label>
  <textarea id="prompt" rows="3" placeholder="a red circle"></textarea>
  <label for="negative_prompt">Negative prompt</label>
  <textarea id="negative_prompt" rows="2"></textarea>
  <label for="model">Model</label><select id="model"></select>
  <label for="lora">LoRA</label>
  <div class="row"><div><select id="lora"><option value="">(none)</option></select></div>
    <div><input id="lora_weight" type="number" step="0.05" value="0.8" title="LoRA weight"></div></div>
  <label for="cn_model_0">ControlNet</label>
  <div id="units"></div>
  <label for="sampler_name">Sampler</label><select id="sampler_name"></select>
  <div class="row">
    <div><label for="steps">Steps</label><input id="steps" type="number" min="1" value="20"></div>
    <div><label for="cfg_scale">CFG</label><input id="cfg_scale" type="number" step="0.5" value="7"></div>
  </div>
  <div class="row">
    <div><label for="width">Width</label><input id="width" type="number" step="8" value="512"></div>
    <div><label for="height">Height</label><input id="height" type="number" step="8" value="512"></div>
  </div>
  <div class="row">
    <div><label for="seed">Seed</label><input id="seed" type="number" value="-1"></div>
    <div><label for="batch_size">Batch</label><input id="batch_size" type="number" min="1" value="1"></div>
  </div>
  <div class="row">
    <div class="txt2img-only"><label for="enable_hr">Hires fix</label><input id="enable_hr" type="checkbox"></div>
    <div class="txt2img-only"><label for="hr_scale">Upscale</label>
      <input id="hr_scale" type="number" step="0.25" value="2"></div>
    <div><label for="denoising_strength">Denoise</label>
      <input id="denoising_strength" type="number" step="0.05" min="0.05" max="1" value="0.7"></div>
  </div>
  <div class="txt2img-only"><label for="hr_upscaler">Hires upscaler</label><select id="hr_upscaler"></select></div>
  <button id="generate" type="submit">Generate</button>
  <button id="cancel" type="button" disabled>Cancel</button>
</form>
<main>
  <section id="img2img" class="img2img-only">
    <label for="init_image">Image (paint on it to inpaint: the painted part is redrawn)</label>
    <input id="init_image" type="file" accept="image/*" style="width: auto">
    <div><div id="sketch"><img id="init_view" alt="the image to redraw"><canvas id="mask"></canvas></div></div>
    <div class="row">
      <div><label for="resize_mode">Resize mode</label><select id="resize_mode">
        <option value="0">Just resize</option><option value="1">Crop and resize</option>
        <option value="2">Resize and fill</option>
        <option value="3">Just resize (latent upscale)</option></select></div>
      <div><label for="brush">Brush (px of the image)</label><input id="brush" type="number" min="1" value="12"></div>
      <div><label for="eraser">Eraser</label><input id="eraser" type="checkbox"></div>
      <div><button type="button" id="clear_mask">Clear mask</button></div>
      <div><label for="mask_blur">Mask blur</label><input id="mask_blur" type="number" min="0" max="64" value="4"></div>
      <div><label for="inpainting_mask_invert">Mask mode</label><select id="inpainting_mask_invert">
        <option value="0">Inpaint masked</option><option value="1">Inpaint not masked</option></select></div>
    </div>
    <div class="row">
      <div><label for="inpainting_fill">Masked content</label><select id="inpainting_fill">
        <option value="0">fill</option><option value="1" selected>original</option>
        <option value="2">latent noise</option><option value="3">latent nothing</option></select></div>
      <div><label for="inpaint_full_res">Inpaint area</label><select id="inpaint_full_res">
        <option value="false">Whole picture</option><option value="true">Only masked</option></select></div>
      <div><label for="inpaint_full_res_padding">Only masked padding</label>
        <input id="inpaint_full_res_padding" type="number" min="0" max="256" value="32"></div>
      <div><label for="soft_inpainting" title="blends the blurred edge: a large mask blur suits it">Soft
        inpainting</label><input id="soft_inpainting" type="checkbox"></div>
    </div>
  </section>
  <progress id="progress" max="1" value="0"></progress>
  <div id="status"></div>
  <div id="gallery"></div>
</main>
<script>
const $ = (id) => document.getElementById(id);
const fields = ["prompt", "negative_prompt", "sampler_name", "steps", "cfg_scale", "width", "height", "seed",
                "batch_size", "denoising_strength"];
// Each tab's own fields, with A1111's UI defaults for an inpaint (the API's differ: its area is "only masked").
const tabFields = {txt2img: ["enable_hr", "hr_scale", "hr_upscaler"],
                   img2img: ["resize_mode", "mask_blur", "inpainting_mask_invert", "inpainting_fill",
                             "inpaint_full_res", "inpaint_full_res_padding"]};
const numbers = new Set(["steps", "cfg_scale", "width", "height", "seed", "batch_size", "hr_scale",
                         "denoising_strength", "resize_mode", "mask_blur", "inpainting_mask_invert",
                         "inpainting_fill", "inpaint_full_res_padding"]);
const checkboxes = new Set(["enable_hr"]);
const read = (name) => checkboxes.has(name) ? $(name).checked : numbers.has(name) ? Number($(name).value)
  : name === "inpaint_full_res" ? $(name).value === "true" : $(name).value;
let mode = "txt2img";
let initImage = null;  // the img2img image, a data URL
const UNITS = 3;  // ControlNet units: the extension's default number
const LIMITS = __LIMITS__;  // this server's (serve --max-size ...), written in when the page is served
const controlImages = new Array(UNITS).fill(null);  // each unit's image, a data URL
for (let i = 0; i < UNITS; i++) {
  $("units").insertAdjacentHTML("beforeend", `<div class="unit">Unit ${i}</div>
  <div class="row"><div><select id="cn_model_${i}" title="unit ${i} model"><option value="">(none)</option></select>
    </div><div><input id="cn_weight_${i}" type="number" step="0.05" value="1" title="unit ${i} weight"></div></div>
  <div class="row"><div><select id="cn_module_${i}" title="unit ${i} preprocessor"></select></div>
    <div><input id="cn_image_${i}" type="file" accept="image/*" title="unit ${i} control image"></div></div>`);
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function fill(select, items, value, label) {
  for (const item of items) {
    const option = document.createElement("option");
    option.value = value(item); option.textContent = label(item);
    select.appendChild(option);
  }
}

async function load() {
  const [samplers, models, loras, options, latent, upscalers, controlnets, modules] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/loras"), api("/sdapi/v1/options"),
    api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers"), api("/controlnet/model_list"),
    api("/controlnet/module_list")]);
  for (let i = 0; i < UNITS; i++) {
    fill($(`cn_model_${i}`), controlnets.model_list, (m) => m, (m) => m);
    fill($(`cn_module_${i}`), modules.module_list, (m) => m, (m) => m);
  }
  // A1111's list: the latent modes, then None, Lanczos, Nearest and the server's model upscalers (ESRGAN ...).
  fill($("hr_upscaler"), [...latent, ...upscalers], (u) => u.name, (u) => u.name);
  fill($("sampler_name"), samplers, (s) => s.name, (s) => s.name);
  $("sampler_name").value = "Euler a";
  fill($("model"), models, (m) => m.title, (m) => m.title);
  $("model").value = options.sd_model_checkpoint;
  fill($("lora"), loras, (l) => l.name, (l) => l.name);
}

function setMode(name) {
  mode = name;
  document.body.dataset.mode = name;
  for (const tab of ["txt2img", "img2img"]) $("tab_" + tab).classList.toggle("active", tab === name);
}

function setImage(dataUrl) {
  initImage = dataUrl;
  if (dataUrl) $("init_view").src = dataUrl;
  else $("init_view").removeAttribute("src");
}

// The mask canvas takes the image's own size: one canvas pixel is one image pixel, however it is shown.
$("init_view").addEventListener("load", () => {
  const image = $("init_view"), mask = $("mask");
  mask.width = image.naturalWidth; mask.height = image.naturalHeight;
  clearMask();
  // Drawn at the image's size, to a multiple of 8 (A1111's sizes are), within what this server draws.
  const fit = (side, most) => Math.min(most, Math.max(64, Math.floor(side / 8) * 8));
  $("width").value = fit(image.naturalWidth, LIMITS.max_width);
  $("height").value = fit(image.naturalHeight, LIMITS.max_height);
});

function clearMask() {
  $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height);
}

let last = null;  // the stroke's previous point, in image pixels
function imagePoint(event) {
  const mask = $("mask"), box = mask.getBoundingClientRect();
  return [(event.clientX - box.left) * mask.width / box.width, (event.clientY - box.top) * mask.height / box.height];
}
function paint(event) {
  const context = $("mask").getContext("2d"), point = imagePoint(event);
  context.strokeStyle = context.fillStyle = "#fff";
  context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  context.lineWidth = Number($("brush").value);
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  context.moveTo(...(last || point));
  context.lineTo(...point);
  context.stroke();
  last = point;
}
$("mask").addEventListener("pointerdown", (event) => { $("mask").setPointerCapture(event.pointerId); paint(event); });
$("mask").addEventListener("pointermove", (event) => { if (last) paint(event); });
for (const end of ["pointerup", "pointercancel"]) $("mask").addEventListener(end, () => { last = null; });

// White where painted on black, opaque: what A1111's API reads as a mask; null where nothing is painted.
// Binary at half cover, as A1111's UI makes its canvas a mask (create_binary_mask): a stroke's antialiased rim,
// and the faint rim an eraser stroke leaves of it, count as painted only where more than half covered.
function maskImage() {
  const mask = $("mask");
  if (!mask.width || !mask.height) return null;
  const pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  let any = false;
  for (let i = 0; i < pixels.data.length; i += 4) {
    const value = pixels.data[i + 3] > 128 ? 255 : 0;
    any = any || value > 0;
    pixels.data.fill(value, i, i + 3);
    pixels.data[i + 3] = 255;
  }
  if (!any) return null;
  const out = document.createElement("canvas");
  out.width = mask.width; out.height = mask.height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function request() {
  const body = {};
  for (const name of [...fields, ...tabFields[mode]]) body[name] = read(name);
  if ($("lora").value) body.prompt += ` <lora:${$("lora").value}:${$("lora_weight").value}>`;
  body.override_settings = {sd_model_checkpoint: $("model").value};
  const scripts = {};
  // Every unit in its slot, the ones without a model disabled, as A1111's UI sends them: "Reuse settings" puts
  // each back where it was (with the enabled ones alone, a unit 1 came back as unit 0, beside unit 0's image).
  const units = [];
  for (let i = 0; i < UNITS; i++) {
    if (!$(`cn_model_${i}`).value) { units.push({enabled: false}); continue; }
    if (!controlImages[i]) throw new Error(`ControlNet unit ${i} needs its control image`);
    units.push({enabled: true, image: controlImages[i], module: $(`cn_module_${i}`).value,
                model: $(`cn_model_${i}`).value, weight: Number($(`cn_weight_${i}`).value)});
  }
  if (units.some((unit) => unit.enabled)) scripts.ControlNet = {args: units};
  if (mode === "img2img") {
    body.init_images = [initImage];
    const mask = maskImage();
    if (mask) body.mask = mask;
    // A1111's script, with its defaults: [enabled, schedule bias, preservation strength, ...]
    if ($("soft_inpainting").checked) scripts["soft inpainting"] = {args: [true]};
  }
  if (Object.keys(scripts).length) body.alwayson_scripts = scripts;
  return body;
}

function reuse(parameters, kind) {
  setMode(kind);
  for (const name of [...fields, ...tabFields[kind]]) {
    if (!(name in parameters)) continue;
    if (checkboxes.has(name)) $(name).checked = Boolean(parameters[name]);
    else $(name).value = String(parameters[name]);
  }
  const model = (parameters.override_settings || {}).sd_model_checkpoint;
  if (model) $("model").value = model;
  $("lora").value = "";
  const scripts = parameters.alwayson_scripts || {};
  if (kind === "img2img") {
    const soft = scripts["soft inpainting"];
    $("soft_inpainting").checked = Boolean(soft && soft.args && soft.args[0]);
  }
  const units = (scripts.ControlNet || {}).args || [];  // by slot; their images stay the ones chosen now
  for (let i = 0; i < UNITS; i++) {
    const unit = units[i] && units[i].enabled !== false ? units[i] : null;
    $(`cn_model_${i}`).value = unit ? unit.model : "";
    if (unit) { $(`cn_module_${i}`).value = unit.module; $(`cn_weight_${i}`).value = String(unit.weight); }
  }
}

function show(job) {
  const info = JSON.parse(job.result.info);
  job.result.images.forEach((image, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + image;
    img.alt = info.infotexts[index];
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[index];
    const download = document.createElement("a");
    download.href = img.src; download.download = `difftrain-${info.all_seeds[index]}.png`;
    download.textContent = "Download PNG";
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Reuse settings"; again.className = "reuse";
    again.onclick = () => reuse({...job.result.parameters, seed: info.all_seeds[index], batch_size: 1}, job.type);
    const send = document.createElement("button");
    send.type = "button"; send.textContent = "Send to img2img"; send.className = "send";
    send.onclick = () => { setImage(img.src); setMode("img2img"); };
    figure.append(img, caption, download, again, send);
    $("gallery").prepend(figure);
  });
}

$("tab_txt2img").onclick = () => setMode("txt2img");
$("tab_img2img").onclick = () => setMode("img2img");
$("clear_mask").onclick = clearMask;
function readFile(input, use) {
  input.addEventListener("change", () => {
    if (!input.files[0]) { use(null); return; }  // cleared: no image (the old one went on being sent)
    const reader = new FileReader();
    reader.onload = () => use(reader.result);
    reader.readAsDataURL(input.files[0]);
  });
}
readFile($("init_image"), setImage);
for (let i = 0; i < UNITS; i++) readFile($(`cn_image_${i}`), (dataUrl) => { controlImages[i] = dataUrl; });

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (mode === "img2img" && !initImage) {
    $("status").textContent = "error: img2img needs an image: upload one or send one from the gallery";
    return;
  }
  $("generate").disabled = true;
  $("status").textContent = "queued";
  try {
    let job = await api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify({type: mode, request: request()})});
    // The queue's own cancel: a queued job leaves it, a running one stops at its next step.
    $("cancel").onclick = () => api(`/v1/jobs/${job.id}`, {method: "DELETE"});
    $("cancel").disabled = false;
    while (job.state === "queued" || job.state === "running") {
      await new Promise((resolve) => setTimeout(resolve, 200));
      job = await api(`/v1/jobs/${job.id}`);
      $("progress").value = job.progress;
      $("status").textContent = job.state === "queued" ? `queued (${job.queue_position} ahead)`
        : job.progress ? `${Math.round(job.progress * 100)}%, about ${Math.ceil(job.eta_relative)} s left`
        : "starting";  // (no rate yet to tell the time left by)
    }
    if (job.state === "failed") throw new Error(job.error);
    $("progress").value = job.state === "done" ? 1 : 0;  // a cancelled job drew nothing
    $("status").textContent = job.state;
    if (job.result) show(job);
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
});

load().catch((error) => { $("status").textContent = "error: " + error.message; });
</script>
</body>
</html>
"""


def page_for(limits) -> str:
    """The page with this server's limits written in (an upload's size is fitted to them)."""
    import json

    return PAGE.replace("__LIMITS__", json.dumps({"max_width": limits.max_width, "max_height": limits.max_height}))
