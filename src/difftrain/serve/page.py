"""The web page at `/`: one self-contained HTML file (no build step, no CDN: it works offline).

It speaks the server's own API: the lists from `/sdapi/v1/*`, each generation a job on
`/v1/jobs` polled for its progress, so the page and any other client wait in the same queue.
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
</style>
</head>
<body>
<form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" rows="3" placeholder="a red circle"></textarea>
  <label for="negative_prompt">Negative prompt</label>
  <textarea id="negative_prompt" rows="2"></textarea>
  <label for="model">Model</label><select id="model"></select>
  <label for="lora">LoRA</label>
  <div class="row"><div><select id="lora"><option value="">(none)</option></select></div>
    <div><input id="lora_weight" type="number" step="0.05" value="0.8" title="LoRA weight"></div></div>
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
    <div><label for="enable_hr">Hires fix</label><input id="enable_hr" type="checkbox"></div>
    <div><label for="hr_scale">Upscale</label><input id="hr_scale" type="number" step="0.25" value="2"></div>
    <div><label for="denoising_strength">Denoise</label>
      <input id="denoising_strength" type="number" step="0.05" min="0.05" max="1" value="0.7"></div>
  </div>
  <label for="hr_upscaler">Hires upscaler</label><select id="hr_upscaler"></select>
  <button id="generate" type="submit">Generate</button>
</form>
<main>
  <progress id="progress" max="1" value="0"></progress>
  <div id="status"></div>
  <div id="gallery"></div>
</main>
<script>
const $ = (id) => document.getElementById(id);
const fields = ["prompt", "negative_prompt", "sampler_name", "steps", "cfg_scale", "width", "height", "seed",
                "batch_size", "enable_hr", "hr_scale", "denoising_strength", "hr_upscaler"];
const numbers = new Set(["steps", "cfg_scale", "width", "height", "seed", "batch_size", "hr_scale",
                         "denoising_strength"]);
const checkboxes = new Set(["enable_hr"]);
const read = (name) => checkboxes.has(name) ? $(name).checked : numbers.has(name) ? Number($(name).value)
  : $(name).value;

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
  const [samplers, models, loras, options, latent, upscalers] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/loras"), api("/sdapi/v1/options"),
    api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers")]);
  // A1111's list: the latent modes, then None, Lanczos, Nearest and the server's model upscalers (ESRGAN ...).
  fill($("hr_upscaler"), [...latent, ...upscalers], (u) => u.name, (u) => u.name);
  fill($("sampler_name"), samplers, (s) => s.name, (s) => s.name);
  $("sampler_name").value = "Euler a";
  fill($("model"), models, (m) => m.title, (m) => m.title);
  $("model").value = options.sd_model_checkpoint;
  fill($("lora"), loras, (l) => l.name, (l) => l.name);
}

function request() {
  const body = {};
  for (const name of fields) body[name] = read(name);
  if ($("lora").value) body.prompt += ` <lora:${$("lora").value}:${$("lora_weight").value}>`;
  body.override_settings = {sd_model_checkpoint: $("model").value};
  return body;
}

function reuse(parameters) {
  for (const name of fields) {
    if (!(name in parameters)) continue;
    if (checkboxes.has(name)) $(name).checked = Boolean(parameters[name]); else $(name).value = parameters[name];
  }
  const model = (parameters.override_settings || {}).sd_model_checkpoint;
  if (model) $("model").value = model;
  $("lora").value = "";
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
    again.type = "button"; again.textContent = "Reuse settings";
    again.onclick = () => reuse({...job.result.parameters, seed: info.all_seeds[index], batch_size: 1});
    figure.append(img, caption, download, again);
    $("gallery").prepend(figure);
  });
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("generate").disabled = true;
  $("status").textContent = "queued";
  try {
    let job = await api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify({type: "txt2img", request: request()})});
    while (job.state === "queued" || job.state === "running") {
      await new Promise((resolve) => setTimeout(resolve, 200));
      job = await api(`/v1/jobs/${job.id}`);
      $("progress").value = job.progress;
      $("status").textContent = job.state === "queued" ? `queued (${job.queue_position} ahead)`
        : `${Math.round(job.progress * 100)}%, about ${Math.ceil(job.eta_relative)} s left`;
    }
    if (job.state === "failed") throw new Error(job.error);
    $("progress").value = 1;
    $("status").textContent = job.state;
    if (job.result) show(job);
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  } finally {
    $("generate").disabled = false;
  }
});

load().catch((error) => { $("status").textContent = "error: " + error.message; });
</script>
</body>
</html>
"""
