// @ts-check
// The web UI of dspo-server: plain ES module, no dependencies, served from the binary.
// The types below come from the server's own OpenAPI document (tests/web generates them and
// type-checks this file), so a change of the API that this page does not follow fails the tests.

/** @typedef {import("dspo-api").paths} Paths */
/** @typedef {import("dspo-api").components["schemas"]} Schemas */
/** @typedef {Schemas["GenerateRequest"]} GenerateRequest */
/** @typedef {Schemas["GenerateResponse"]} GenerateResponse */
/** @typedef {Schemas["GeneratedImage"]} GeneratedImage */
/** @typedef {Schemas["EditRequest"]} EditRequest */
/** @typedef {Schemas["Parameters"]} ImageParameters */
/** @typedef {Schemas["ModelsResponse"]} ModelsResponse */
/** @typedef {Schemas["ModelEntry"]} ModelEntry */
/** @typedef {Schemas["HealthResponse"]} HealthResponse */
/** @typedef {Schemas["Scheduler"]} Scheduler */
/** @typedef {Schemas["EditMode"]} EditMode */
/** @typedef {Schemas["JobSpec"]} JobSpec */
/** @typedef {Schemas["LoraRequest"]} LoraRequest */
/** @typedef {Schemas["Hyperparameters"]} Hyperparameters */
/** @typedef {{[K in keyof Hyperparameters]-?: NonNullable<Hyperparameters[K]> extends number ? K : never}[keyof Hyperparameters]} NumericHyperparameter */
/** @typedef {Schemas["Method"]} Method */
/** @typedef {Schemas["JobCreated"]} JobCreated */
/** @typedef {Schemas["JobRecord"]} JobRecord */
/** @typedef {Schemas["JobStatus"]} JobStatus */
/** @typedef {Schemas["Progress"]} Progress */
/** @typedef {Schemas["StepMetrics"]} StepMetrics */
/** @typedef {Schemas["AdapterInfo"]} AdapterInfo */
/** @typedef {Schemas["AdapterUpload"]} AdapterUpload */
/** @typedef {Schemas["ErrorResponse"]} ErrorResponse */
/** @typedef {Schemas["EvaluateRequest"]} EvaluateRequest */
/** @typedef {Schemas["EvaluationCreated"]} EvaluationCreated */
/** @typedef {Schemas["EvaluationRecord"]} EvaluationRecord */
/** @typedef {Schemas["EvaluationStatus"]} EvaluationStatus */
/** @typedef {Schemas["EvaluationRow"]} EvaluationRow */
/** @typedef {Schemas["RewardResult"]} RewardResult */
/** @typedef {Schemas["RewardsAvailable"]} RewardsAvailable */

/** @typedef {{step: number, loss: number, accuracy: number | null}} Point */

const KEY_STORAGE = "dspo-server.api-key";
/** @type {ReadonlyArray<JobStatus>} */
const TERMINAL = ["completed", "failed", "cancelled"];
/** @type {ReadonlyArray<EvaluationStatus>} */
const EVAL_TERMINAL = ["completed", "failed", "cancelled"];
/** How often a running evaluation is asked for its progress, in milliseconds. */
const EVAL_POLL_MS = 500;
/** @type {ReadonlyArray<[Method, string]>} */
const METHODS = [
  ["dspo", "DSPO (score matching)"],
  ["diffusion_dpo", "Diffusion-DPO"],
  ["sft", "SFT (winners only)"],
  ["dspo_e", "DSPO-E (energy)"],
  ["diffusion_kto", "Diffusion-KTO"],
  ["dspo_sdxl", "DSPO (official SDXL branch)"],
];
/** @type {ReadonlyArray<EditMode>} */
const EDIT_MODES = ["instruct_pix2pix", "img2img"];

// ---------------------------------------------------------------------------------------------
// DOM helpers: each checks the element's kind, so a renamed id fails loudly at start-up.

/** @param {string} id @returns {HTMLElement} */
function $(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing from the page`);
  return el;
}
/** @template {HTMLElement} T @param {string} id @param {{new (): T}} kind @returns {T} */
function typed(id, kind) {
  const el = $(id);
  if (!(el instanceof kind)) throw new Error(`#${id} is not a ${kind.name}`);
  return el;
}
/** @param {string} id */
const input = (id) => typed(id, HTMLInputElement);
/** @param {string} id */
const select = (id) => typed(id, HTMLSelectElement);
/** @param {string} id */
const textarea = (id) => typed(id, HTMLTextAreaElement);
/** @param {string} id */
const button = (id) => typed(id, HTMLButtonElement);

/**
 * An element with text content and attributes; text is never parsed as markup.
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Record<string, string>} [attrs]
 * @param {...(Node | string)} children
 * @returns {HTMLElementTagNameMap[K]}
 */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  el.append(...children);
  return el;
}

/**
 * A number input's value; undefined when empty, so that the server's default applies.
 * @param {string} id @returns {number | undefined}
 */
function num(id) {
  const v = input(id).valueAsNumber;
  return Number.isFinite(v) ? v : undefined;
}
/** @param {string} id @returns {string | undefined} */
function text(id) {
  const el = $(id);
  const v = el instanceof HTMLInputElement || el instanceof HTMLTextAreaElement || el instanceof HTMLSelectElement ? el.value.trim() : "";
  return v === "" ? undefined : v;
}

/** @param {HTMLSelectElement} sel @param {ReadonlyArray<[string, string]>} options @param {string} [keep] */
function fillSelect(sel, options, keep = sel.value) {
  sel.replaceChildren(...options.map(([value, label]) => h("option", { value }, label)));
  if (options.some(([v]) => v === keep)) sel.value = keep;
}

const randomSeed = () => Math.floor(Math.random() * 2 ** 32);
/** @param {number} t seconds since the epoch */
const when = (t) => new Date(t * 1000).toLocaleString();

// ---------------------------------------------------------------------------------------------
// The API: every call carries the key, and every failure becomes the server's own error.

class ApiError extends Error {
  /** @param {number} status @param {string} code @param {string} message */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * A path of the OpenAPI document with its `{params}` filled in: a route the document no longer
 * has fails the type check.
 * @param {keyof Paths} template
 * @param {Record<string, string>} [params]
 */
function route(template, params = {}) {
  return template.replace(/\{(\w+)\}/g, (_, name) => encodeURIComponent(params[name] ?? ""));
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) ?? "";
}

/**
 * @param {string} path
 * @param {{method?: string, body?: unknown, form?: FormData, signal?: AbortSignal, accept?: string}} [opts]
 * @returns {Promise<Response>}
 */
async function call(path, opts = {}) {
  const headers = new Headers({ Accept: opts.accept ?? "application/json" });
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  /** @type {RequestInit} */
  const init = { method: opts.method ?? "GET", headers, signal: opts.signal };
  if (opts.body !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(opts.body);
    init.method = opts.method ?? "POST";
  } else if (opts.form) {
    // The browser writes the multipart boundary into Content-Type itself.
    init.body = opts.form;
    init.method = opts.method ?? "POST";
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e instanceof DOMException && e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", `the server did not answer (${String(e)})`);
  }
  if (!res.ok) throw await errorOf(res);
  return res;
}

/** @param {Response} res @returns {Promise<ApiError>} */
async function errorOf(res) {
  const raw = await res.text();
  try {
    /** @type {ErrorResponse} */
    const body = JSON.parse(raw);
    return new ApiError(res.status, body.error.code, body.error.message);
  } catch {
    return new ApiError(res.status, `http_${res.status}`, raw.slice(0, 300) || res.statusText);
  }
}

/** @param {string} path @param {Parameters<typeof call>[1]} [opts] @returns {Promise<any>} */
async function json(path, opts) {
  const res = await call(path, opts);
  return res.status === 204 ? null : res.json();
}

const api = {
  /** @returns {Promise<HealthResponse>} */
  health: () => json(route("/health")),
  /** @returns {Promise<ModelsResponse>} */
  models: () => json(route("/models")),
  /** @param {GenerateRequest} body @returns {Promise<GenerateResponse>} */
  generate: (body) => json(route("/generate"), { body }),
  /** @param {EditRequest} body @returns {Promise<GenerateResponse>} */
  edit: (body) => json(route("/edit"), { body }),
  /** @param {JobSpec} body @returns {Promise<JobCreated>} */
  finetune: (body) => json(route("/finetune"), { body }),
  /** @returns {Promise<JobRecord[]>} */
  jobs: () => json(route("/finetune")),
  /** @param {string} id @returns {Promise<JobRecord>} */
  cancel: (id) => json(route("/finetune/{id}", { id }), { method: "DELETE" }),
  /** @param {string} id @returns {Promise<StepMetrics[]>} */
  metrics: (id) => json(route("/finetune/{id}/metrics", { id })),
  /** @param {string} id @param {AbortSignal} signal */
  events: (id, signal) => call(route("/finetune/{id}/events", { id }), { signal, accept: "text/event-stream" }),
  /** @returns {Promise<AdapterInfo[]>} */
  adapters: () => json(route("/adapters")),
  /** @param {string} name */
  weights: (name) => call(route("/adapters/{name}/weights", { name }), { accept: "application/octet-stream" }),
  /**
   * multipart/form-data with the fields of the AdapterUpload schema.
   * @param {{[K in keyof AdapterUpload]: AdapterUpload[K] extends string ? string | Blob : string | undefined}} fields
   * @returns {Promise<AdapterInfo>}
   */
  uploadAdapter: (fields) => {
    const form = new FormData();
    for (const [k, v] of Object.entries(fields)) if (v !== undefined) form.append(k, v);
    return json(route("/adapters"), { form });
  },
  /** @param {string} name @returns {Promise<null>} */
  deleteAdapter: (name) => json(route("/adapters/{name}", { name }), { method: "DELETE" }),
  /** @returns {Promise<RewardsAvailable>} */
  rewards: () => json(route("/evaluate/rewards")),
  /** @param {EvaluateRequest} body @returns {Promise<EvaluationCreated>} */
  evaluate: (body) => json(route("/evaluate"), { body }),
  /** @returns {Promise<EvaluationRecord[]>} */
  evaluations: () => json(route("/evaluate")),
  /** @param {string} id @param {AbortSignal} [signal] @returns {Promise<EvaluationRecord>} */
  evaluation: (id, signal) => json(route("/evaluate/{id}", { id }), { signal }),
  /** @param {string} id @returns {Promise<EvaluationRecord>} */
  cancelEvaluation: (id) => json(route("/evaluate/{id}", { id }), { method: "DELETE" }),
  /**
   * The per-image rows (a JSON array of EvaluationRow), as the response: saved as they come.
   * 409 evaluation_not_finished before the evaluation completes.
   * @param {string} id
   */
  evaluationRows: (id) => call(route("/evaluate/{id}/rows", { id })),
};

// ---------------------------------------------------------------------------------------------
// Errors

/** @param {unknown} e */
function showError(e) {
  if (e instanceof DOMException && e.name === "AbortError") return;
  const code = e instanceof ApiError ? e.code : "client_error";
  const message = e instanceof Error ? e.message : String(e);
  $("error-code").textContent = code;
  $("error-message").textContent = message;
  const box = $("error");
  box.dataset.code = code;
  box.hidden = false;
  if (e instanceof ApiError && e.status === 401) input("api-key").focus();
}

function clearError() {
  $("error").hidden = true;
  delete $("error").dataset.code;
}

/**
 * Runs a form's action with its submit button disabled and a busy note shown, and shows what
 * fails.
 * @param {HTMLButtonElement} btn @param {HTMLElement | null} busy @param {() => Promise<void>} action
 */
async function busyWhile(btn, busy, action) {
  btn.disabled = true;
  if (busy) busy.hidden = false;
  clearError();
  try {
    await action();
  } catch (e) {
    showError(e);
  } finally {
    btn.disabled = false;
    if (busy) busy.hidden = true;
  }
}

// ---------------------------------------------------------------------------------------------
// State shared by the tabs

/** @type {ModelEntry[]} */
let models = [];
/** @type {AdapterInfo[]} */
let adapters = [];
/** The image the Edit tab works on, as a data: URL. */
let editSource = "";

/** @param {string} name */
const modelNamed = (name) => models.find((m) => m.name === name);

function defaultModel() {
  return models.find((m) => m.default);
}

/**
 * A model picker holding the models that support one of `modes`, the server's default first.
 * @param {HTMLSelectElement} sel @param {string[]} modes
 */
function fillModels(sel, modes) {
  const fit = models.filter((m) => m.modes.some((x) => modes.includes(x)) || !m.loaded);
  const keep = sel.value || (fit.find((m) => m.default) ?? fit[0])?.name;
  fillSelect(
    sel,
    fit.map((m) => [m.name, m.loaded ? `${m.name}${m.default ? " (default)" : ""}` : `${m.name} (${m.error ? "failed" : "loading"})`]),
    keep,
  );
}

/**
 * The adapters for a model: those recorded for it, and those whose base model is unknown.
 * @param {HTMLSelectElement} sel @param {string} model
 */
function fillAdapters(sel, model) {
  const fit = adapters.filter((a) => !a.base_model || a.base_model === model);
  fillSelect(sel, [["", "none"], ...fit.map((a) => /** @type {[string, string]} */ ([a.name, `${a.name} (${a.method})`]))]);
}

/** Placeholders show the model's defaults, which an empty field leaves to the server. */
function onGenerateModel() {
  const m = modelNamed(select("gen-model").value);
  const d = m?.defaults;
  input("gen-steps").placeholder = d ? String(d.steps) : "";
  input("gen-guidance").placeholder = d ? String(d.guidance_scale) : "";
  input("gen-width").placeholder = d ? String(d.width) : "";
  input("gen-height").placeholder = d ? String(d.height) : "";
  fillSelect(select("gen-scheduler"), [
    ["", d ? `model default (${d.scheduler})` : "model default"],
    ...(m?.schedulers ?? []).map((s) => /** @type {[string, string]} */ ([s, s])),
  ]);
  fillAdapters(select("gen-adapter"), m?.name ?? "");
}

function onEditModel() {
  const m = modelNamed(select("edit-model").value);
  const modes = EDIT_MODES.filter((x) => m?.modes.includes(x));
  fillSelect(select("edit-mode"), modes.map((x) => [x, x]));
  const d = m?.defaults;
  input("edit-steps").placeholder = d ? String(d.steps) : "";
  input("edit-guidance").placeholder = d ? String(d.guidance_scale) : "";
  input("edit-strength").placeholder = d?.strength != null ? String(d.strength) : "";
  input("edit-image-guidance").placeholder = d?.image_guidance_scale != null ? String(d.image_guidance_scale) : "";
  fillAdapters(select("edit-adapter"), m?.name ?? "");
  onEditMode();
}

/** Each edit mode has its own strength parameter; the other one is only a warning. */
function onEditMode() {
  const mode = select("edit-mode").value;
  input("edit-strength").disabled = mode !== "img2img";
  input("edit-image-guidance").disabled = mode !== "instruct_pix2pix";
}

async function loadModels() {
  const r = await api.models();
  models = r.models;
  fillModels(select("gen-model"), ["txt2img"]);
  fillModels(select("edit-model"), [...EDIT_MODES]);
  fillModels(select("upload-model"), ["txt2img", ...EDIT_MODES]);
  fillModels(select("ev-model"), ["txt2img", ...EDIT_MODES]);
  const ft = select("ft-base-model");
  fillSelect(ft, [["", `server default${defaultModel() ? ` (${defaultModel()?.name})` : ""}`], ...models.map((m) => /** @type {[string, string]} */ ([m.name, m.name]))]);
  onGenerateModel();
  onEditModel();
  onEvalModel();
}

async function loadHealth() {
  try {
    const r = await api.health();
    const loading = r.models.filter((m) => !m.loaded).length;
    $("server-status").textContent = `v${r.version} · ${r.models.length} model${r.models.length === 1 ? "" : "s"}${loading ? `, ${loading} loading` : ""}`;
  } catch {
    $("server-status").textContent = "server unreachable";
  }
}

// ---------------------------------------------------------------------------------------------
// Gallery

/**
 * One card per image, with what made it: a card is enough to reproduce or reuse the image.
 * @param {GeneratedImage} im @param {ImageParameters} p @param {string[]} warnings
 */
function card(im, p, warnings) {
  const seed = im.seed;
  const src = `data:${im.mime_type};base64,${im.png_base64 ?? im.image_base64 ?? ""}`;
  const ext = im.mime_type.split("/")[1] ?? "png";
  const img = h("img", {
    src,
    alt: p.prompt,
    "data-testid": "gallery-image",
    "data-seed": String(seed),
    "data-width": String(p.width),
    "data-height": String(p.height),
  });
  const facts = [
    ["seed", String(seed)],
    ["model", p.model],
    ["mode", p.mode],
    ["size", `${p.width}×${p.height}`],
    ["steps", String(p.steps)],
    ["cfg", String(p.guidance_scale)],
    ["scheduler", p.scheduler],
  ];
  if (p.strength != null) facts.push(["strength", String(p.strength)]);
  if (p.image_guidance_scale != null) facts.push(["image cfg", String(p.image_guidance_scale)]);
  if (p.adapter) facts.push(["adapter", `${p.adapter} × ${p.adapter_scale ?? 1}`]);
  const dl = h("dl", {}, ...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k }, v)]));
  const reuse = h("button", { type: "button", class: "small", "data-testid": "reuse" }, "Edit");
  reuse.addEventListener("click", () => {
    setEditSource(src);
    showTab("edit");
  });
  const again = h("button", { type: "button", class: "small", "data-testid": "reuse-settings" }, "Settings");
  again.title = "Copy these settings into the Generate form";
  again.addEventListener("click", () => {
    reuseSettings(p, seed);
    showTab("generate");
  });
  const save = h("a", { href: src, download: `${p.model}-${seed}.${ext}`, class: "button small" }, "Download");
  const caption = h("figcaption", {}, h("p", { class: "prompt" }, p.prompt), dl, h("div", { class: "row" }, reuse, again, save));
  if (p.negative_prompt) caption.insertBefore(h("p", { class: "muted" }, `not: ${p.negative_prompt}`), dl);
  if (warnings.length) caption.append(h("p", { class: "warn" }, warnings.join("; ")));
  return h("figure", { class: "card", "data-testid": "gallery-card", "data-seed": String(seed) }, img, caption);
}

/** @param {HTMLElement} gallery @param {GenerateResponse} r */
function addToGallery(gallery, r) {
  const cards = r.images.map((im) => card(im, r.parameters, r.warnings));
  gallery.prepend(...cards);
}

/** @param {string} listId @param {string[]} warnings */
function showWarnings(listId, warnings) {
  $(listId).replaceChildren(...warnings.map((w) => h("li", {}, w)));
}

/** @param {ImageParameters} p @param {number} seed */
function reuseSettings(p, seed) {
  if (modelNamed(p.model)) {
    select("gen-model").value = p.model;
    onGenerateModel();
  }
  textarea("gen-prompt").value = p.prompt;
  input("gen-negative").value = p.negative_prompt ?? "";
  input("gen-steps").value = String(p.steps);
  input("gen-guidance").value = String(p.guidance_scale);
  input("gen-width").value = String(p.width);
  input("gen-height").value = String(p.height);
  input("gen-seed").value = String(seed);
  select("gen-scheduler").value = p.scheduler;
  select("gen-adapter").value = p.adapter ?? "";
  input("gen-adapter-scale").value = p.adapter_scale != null && p.adapter ? String(p.adapter_scale) : "";
}

// ---------------------------------------------------------------------------------------------
// Generate

async function generate() {
  /** @type {GenerateRequest} */
  const req = {
    prompt: textarea("gen-prompt").value,
    negative_prompt: text("gen-negative"),
    model: text("gen-model"),
    steps: num("gen-steps"),
    guidance_scale: num("gen-guidance"),
    width: num("gen-width"),
    height: num("gen-height"),
    seed: num("gen-seed"),
    scheduler: /** @type {Scheduler | undefined} */ (text("gen-scheduler")),
    num_images: num("gen-num-images"),
    adapter: text("gen-adapter"),
  };
  if (req.adapter) req.adapter_scale = num("gen-adapter-scale");
  const r = await api.generate(req);
  showWarnings("gen-warnings", r.warnings);
  addToGallery($("gallery"), r);
}

// ---------------------------------------------------------------------------------------------
// Edit

/** @param {string} dataUrl */
function setEditSource(dataUrl) {
  editSource = dataUrl;
  const img = typed("edit-source", HTMLImageElement);
  img.src = dataUrl;
  img.hidden = false;
}

/** @param {File} file @returns {Promise<string>} */
function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(r.error ?? new Error("could not read the file"));
    r.readAsDataURL(file);
  });
}

async function edit() {
  if (!editSource) throw new ApiError(0, "no_image", "choose an image file, or “Edit” one of the gallery");
  const mode = /** @type {EditMode | undefined} */ (text("edit-mode"));
  /** @type {EditRequest} */
  const req = {
    // The server takes a data: URL as it is, but plain base64 is what the schema promises.
    image: editSource.slice(editSource.indexOf(",") + 1),
    prompt: textarea("edit-prompt").value,
    negative_prompt: text("edit-negative"),
    model: text("edit-model"),
    mode,
    steps: num("edit-steps"),
    guidance_scale: num("edit-guidance"),
    seed: num("edit-seed"),
    adapter: text("edit-adapter"),
  };
  if (mode === "img2img") req.strength = num("edit-strength");
  if (mode === "instruct_pix2pix") req.image_guidance_scale = num("edit-image-guidance");
  const r = await api.edit(req);
  showWarnings("edit-warnings", r.warnings);
  addToGallery($("edit-gallery"), r);
}

// ---------------------------------------------------------------------------------------------
// Fine-tuning: the job form, the live chart and the job list

/** @type {{id: string, abort: AbortController} | null} */
let watching = null;
/** @type {Point[]} */
let points = [];
let totalSteps = 0;

function jobSpec() {
  /** @type {LoraRequest} */
  const lora = {
    rank: num("ft-rank"),
    alpha: num("ft-alpha"),
    target_modules: text("ft-target-modules")?.split(/[\s,]+/).filter(Boolean),
  };
  /** @type {Hyperparameters} */
  let hyper = {};
  const extra = text("ft-extra");
  if (extra) {
    try {
      hyper = JSON.parse(extra);
    } catch (e) {
      throw new ApiError(0, "invalid_request", `“More” is not a JSON object: ${String(e)}`);
    }
    if (typeof hyper !== "object" || hyper === null || Array.isArray(hyper)) {
      throw new ApiError(0, "invalid_request", "“More” must be a JSON object");
    }
  }
  /** @type {Array<[NumericHyperparameter, number | undefined]>} */
  const fields = [
    ["max_steps", num("ft-max-steps")],
    ["batch_size", num("ft-batch-size")],
    ["learning_rate", num("ft-learning-rate")],
    ["beta", num("ft-beta")],
    ["resolution", num("ft-resolution")],
    ["max_pairs", num("ft-max-pairs")],
    ["warmup_steps", num("ft-warmup-steps")],
    ["checkpoint_every", num("ft-checkpoint-every")],
  ];
  for (const [k, v] of fields) if (v !== undefined) hyper[k] = v;
  const hasLora = Object.values(lora).some((v) => v !== undefined);
  /** @type {JobSpec} */
  const spec = {
    dataset_url: input("ft-dataset-url").value.trim(),
    base_model: text("ft-base-model"),
    method: /** @type {Method | undefined} */ (text("ft-method")),
    adapter_name: text("ft-adapter-name"),
    lora: hasLora ? lora : undefined,
    hyperparameters: Object.keys(hyper).length ? hyper : undefined,
  };
  return spec;
}

async function submitJob() {
  const created = await api.finetune(jobSpec());
  await loadJobs();
  watch(created.job);
}

/** @param {JobRecord} job */
function showJob(job) {
  $("job-view").hidden = false;
  $("job-id").textContent = job.id;
  const badge = $("job-status");
  badge.textContent = job.status;
  badge.dataset.status = job.status;
  $("job-view").dataset.status = job.status;
  button("job-cancel").hidden = TERMINAL.includes(job.status);
  if (job.progress) showProgress(job.progress);
  const detail = [`${job.spec.method ?? "default method"} on ${job.spec.base_model ?? "the default model"}`];
  if (job.adapter) detail.push(`adapter ${job.adapter}`);
  if (job.error) detail.push(`${job.error.code}: ${job.error.message}`);
  $("job-detail").textContent = detail.join(" · ");
  if (job.status === "failed" && job.error) showError(new ApiError(0, job.error.code, job.error.message));
}

/** @param {Progress} p */
function showProgress(p) {
  const bar = typed("job-progress", HTMLProgressElement);
  if (p.total_steps > 0) {
    totalSteps = p.total_steps;
    bar.max = p.total_steps;
    bar.value = p.step;
    const eta = p.eta_seconds != null && p.step < p.total_steps ? ` · about ${Math.ceil(p.eta_seconds)} s left` : "";
    bar.title = `step ${p.step} of ${p.total_steps}${eta}`;
  } else if (p.downloaded_bytes != null) {
    bar.max = p.total_bytes ?? p.downloaded_bytes * 2 + 1;
    bar.value = p.downloaded_bytes;
    bar.title = `downloading: ${p.downloaded_bytes} bytes`;
  }
  if (p.loss != null && p.step > 0 && !points.some((q) => q.step === p.step)) {
    const last = points.reduce((m, q) => Math.max(m, q.step), 0);
    points.push({ step: p.step, loss: p.loss, accuracy: p.implicit_accuracy ?? null });
    drawChart();
    // Progress events come at most twice a second, so fast steps are skipped; the stored
    // history has every one.
    if (p.step > last + 1) backfill();
  }
}

let backfilling = false;

/** Fills the chart's gaps from the job's metrics history, one request at a time. */
async function backfill() {
  const id = watching?.id;
  if (backfilling || !id) return;
  backfilling = true;
  try {
    const history = await api.metrics(id);
    if (watching?.id !== id) return;
    const seen = new Set(points.map((q) => q.step));
    for (const m of history) {
      if (!seen.has(m.step)) points.push({ step: m.step, loss: m.loss, accuracy: m.implicit_accuracy ?? null });
    }
    drawChart();
  } catch {
    // The chart stays as it is; the next progress event or the job's end tries again.
  } finally {
    backfilling = false;
  }
}

/** @param {StepMetrics[]} history */
function setHistory(history) {
  points = history.map((m) => ({ step: m.step, loss: m.loss, accuracy: m.implicit_accuracy ?? null }));
  const last = history[history.length - 1];
  if (last) totalSteps = last.total_steps;
  drawChart();
}

/**
 * Follows a job: its metrics so far, then its Server-Sent Events until it ends. fetch() rather
 * than EventSource, which cannot send the Authorization header.
 * @param {JobRecord} job
 */
async function watch(job) {
  watching?.abort.abort();
  const abort = new AbortController();
  watching = { id: job.id, abort };
  $("job-view").dataset.watching = "live";
  points = [];
  totalSteps = job.progress?.total_steps ?? 0;
  showJob(job);
  drawChart();
  let status = job.status;
  try {
    const history = await api.metrics(job.id);
    if (abort.signal.aborted) return;
    setHistory(history);
    // A dropped connection is resumed; the stream itself ends after the final status.
    for (let attempt = 0; !TERMINAL.includes(status) && !abort.signal.aborted; attempt++) {
      if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(5000, 500 * attempt)));
      const res = await api.events(job.id, abort.signal);
      for await (const ev of sse(res, abort.signal)) {
        if (ev.event === "status") {
          /** @type {JobRecord} */
          const j = JSON.parse(ev.data);
          status = j.status;
          showJob(j);
        } else if (ev.event === "progress") {
          /** @type {Progress} */
          const p = JSON.parse(ev.data);
          showProgress(p);
        }
      }
    }
    if (abort.signal.aborted) return;
    // The complete history, whatever the stream skipped.
    setHistory(await api.metrics(job.id));
    await Promise.all([loadJobs(), loadAdapters()]);
  } catch (e) {
    showError(e);
  } finally {
    if (watching?.abort === abort) $("job-view").dataset.watching = "done";
  }
}

/**
 * Server-Sent Events from a fetch() response, parsed as the HTML standard says: `field: value`
 * lines, a blank line ends an event, lines starting with ':' are comments (keep-alives).
 * @param {Response} res @param {AbortSignal} signal
 * @returns {AsyncGenerator<{event: string, data: string}>}
 */
async function* sse(res, signal) {
  if (!res.body) return;
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const onAbort = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", onAbort);
  let buf = "";
  let event = "";
  /** @type {string[]} */
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      const lines = buf.split(/\r\n|\r|\n/);
      buf = lines.pop() ?? "";
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
    }
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/**
 * Loss (left axis) and implicit accuracy (right axis, 0 to 1) per step. The canvas's
 * `data-points` attribute counts the plotted loss points, for scripts and tests.
 */
function drawChart() {
  const canvas = typed("chart", HTMLCanvasElement);
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 720;
  const cssH = canvas.clientHeight || 260;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const style = getComputedStyle(canvas);
  const fg = style.getPropertyValue("--chart-fg").trim() || "#333";
  const grid = style.getPropertyValue("--chart-grid").trim() || "#ddd";
  const lossColor = style.getPropertyValue("--chart-loss").trim() || "#d9480f";
  const accColor = style.getPropertyValue("--chart-acc").trim() || "#1c7ed6";
  ctx.clearRect(0, 0, cssW, cssH);
  ctx.font = "11px system-ui, sans-serif";
  const pad = { l: 52, r: 44, t: 12, b: 28 };
  const w = cssW - pad.l - pad.r;
  const hgt = cssH - pad.t - pad.b;
  const pts = [...points].sort((a, b) => a.step - b.step);
  const maxStep = Math.max(totalSteps, pts.length ? pts[pts.length - 1].step : 1, 1);
  let lo = Math.min(...pts.map((p) => p.loss));
  let hi = Math.max(...pts.map((p) => p.loss));
  if (!Number.isFinite(lo)) [lo, hi] = [0, 1];
  if (hi - lo < 1e-9) [lo, hi] = [lo - Math.abs(lo) * 0.1 - 1e-3, hi + Math.abs(hi) * 0.1 + 1e-3];
  const span = hi - lo;
  lo -= span * 0.05;
  hi += span * 0.05;
  const x = (/** @type {number} */ s) => pad.l + (maxStep <= 1 ? w / 2 : ((s - 1) / (maxStep - 1)) * w);
  const yLoss = (/** @type {number} */ v) => pad.t + (1 - (v - lo) / (hi - lo)) * hgt;
  const yAcc = (/** @type {number} */ v) => pad.t + (1 - v) * hgt;

  ctx.strokeStyle = grid;
  ctx.fillStyle = fg;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yy = pad.t + (i / 4) * hgt;
    ctx.beginPath();
    ctx.moveTo(pad.l, yy);
    ctx.lineTo(pad.l + w, yy);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText((hi - (i / 4) * (hi - lo)).toPrecision(3), pad.l - 6, yy + 4);
    ctx.textAlign = "left";
    ctx.fillText((1 - i / 4).toFixed(2), pad.l + w + 6, yy + 4);
  }
  ctx.textAlign = "center";
  const ticks = Math.min(maxStep, 8);
  for (let i = 0; i < ticks; i++) {
    const s = ticks === 1 ? 1 : Math.round(1 + (i / (ticks - 1)) * (maxStep - 1));
    ctx.fillText(String(s), x(s), pad.t + hgt + 16);
  }
  ctx.fillText("step", pad.l + w / 2, cssH - 2);

  /** @param {Array<[number, number]>} xy @param {string} color */
  const series = (xy, color) => {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    xy.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
    ctx.stroke();
    for (const [px, py] of xy) {
      ctx.beginPath();
      ctx.arc(px, py, 3, 0, Math.PI * 2);
      ctx.fill();
    }
  };
  const loss = pts.map((p) => /** @type {[number, number]} */ ([x(p.step), yLoss(p.loss)]));
  const acc = pts.flatMap((p) => (p.accuracy == null ? [] : [/** @type {[number, number]} */ ([x(p.step), yAcc(p.accuracy)])]));
  series(acc, accColor);
  series(loss, lossColor);
  canvas.dataset.points = String(loss.length);
  canvas.dataset.accuracyPoints = String(acc.length);
  canvas.setAttribute("aria-label", pts.length ? `loss ${pts[pts.length - 1].loss.toFixed(4)} at step ${pts[pts.length - 1].step}` : "no steps yet");
}

async function loadJobs() {
  /** @type {JobRecord[]} */
  let jobs;
  try {
    jobs = await api.jobs();
  } catch (e) {
    // A `:generate` key may not see jobs; that is no error on a page it can otherwise use.
    if (!(e instanceof ApiError && e.code === "forbidden")) throw e;
    $("jobs").replaceChildren(h("tr", {}, h("td", { colspan: "8", class: "muted" }, `this key may not run jobs: ${e.message}`)));
    return;
  }
  const rows = [...jobs].reverse().map((j) => {
    const watchBtn = h("button", { type: "button", class: "small", "data-testid": "job-watch" }, "Show");
    watchBtn.addEventListener("click", () => watch(j));
    const step = j.progress && j.progress.total_steps ? `${j.progress.step}/${j.progress.total_steps}` : "";
    return h(
      "tr",
      { "data-job-id": j.id, "data-status": j.status },
      h("td", {}, h("code", { title: j.id }, j.id.slice(0, 8))),
      h("td", {}, h("span", { class: "badge", "data-status": j.status }, j.status)),
      h("td", {}, j.spec.method ?? ""),
      h("td", {}, j.spec.base_model ?? ""),
      h("td", {}, step),
      h("td", {}, j.adapter ?? j.spec.adapter_name ?? ""),
      h("td", {}, when(j.created_at)),
      h("td", {}, watchBtn),
    );
  });
  $("jobs").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "8", class: "muted" }, "no jobs yet"))]));
}

// ---------------------------------------------------------------------------------------------
// Adapters

/** @param {unknown} metrics */
function metricsText(metrics) {
  if (typeof metrics !== "object" || metrics === null) return "";
  return Object.entries(metrics)
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : Number(v).toPrecision(3)}`)
    .join(", ");
}

async function loadAdapters() {
  adapters = await api.adapters();
  const rows = adapters.map((a) => {
    const dl = h("button", { type: "button", class: "small", "data-testid": "adapter-download" }, "Download");
    dl.addEventListener("click", () => download(a.name).catch(showError));
    const use = h("button", { type: "button", class: "small", "data-testid": "adapter-use" }, "Use");
    use.title = "Generate with this adapter";
    use.addEventListener("click", () => {
      if (modelNamed(a.base_model)) select("gen-model").value = a.base_model;
      onGenerateModel();
      select("gen-adapter").value = a.name;
      showTab("generate");
    });
    const evaluate = h("button", { type: "button", class: "small", "data-testid": "adapter-evaluate" }, "Evaluate");
    evaluate.title = "Evaluate this adapter (side A) against its base model (side B)";
    evaluate.addEventListener("click", () => {
      if (modelNamed(a.base_model)) select("ev-model").value = a.base_model;
      onEvalModel();
      const sideA = select("ev-adapter-a");
      sideA.value = a.name;
      sideA.dataset.touched = "true";
      select("ev-adapter-b").value = "";
      showTab("evaluate");
    });
    const del = h("button", { type: "button", class: "small danger", "data-testid": "adapter-delete" }, "Delete");
    del.addEventListener("click", async () => {
      if (!confirm(`Delete adapter ${a.name}? Its weights are removed from the server.`)) return;
      try {
        await api.deleteAdapter(a.name);
        await loadAdapters();
      } catch (e) {
        showError(e);
      }
    });
    return h(
      "tr",
      { "data-adapter": a.name },
      h("td", {}, h("strong", {}, a.name)),
      h("td", {}, a.base_model),
      h("td", {}, a.method),
      h("td", {}, metricsText(a.final_metrics)),
      h("td", {}, when(a.created_at)),
      h("td", {}, h("div", { class: "row" }, use, evaluate, dl, del)),
    );
  });
  $("adapters").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "6", class: "muted" }, "no adapters yet: fine-tune one"))]));
  fillAdapters(select("gen-adapter"), select("gen-model").value);
  fillAdapters(select("edit-adapter"), select("edit-model").value);
  fillEvalAdapters();
}

/**
 * The weights need the key, so they are fetched and handed to the browser as a blob.
 * @param {string} name
 */
async function download(name) {
  const res = await api.weights(name);
  saveBlob(await res.blob(), `${name}.safetensors`);
}

/** Hands a blob to the browser as a download. @param {Blob} blob @param {string} filename */
function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

async function uploadAdapter() {
  const file = input("upload-file").files?.[0];
  if (!file) throw new ApiError(0, "invalid_request", "choose a .safetensors file");
  const info = await api.uploadAdapter({ name: input("upload-name").value.trim(), model: text("upload-model"), file });
  typed("upload-form", HTMLFormElement).reset();
  await loadAdapters();
  $("adapters").querySelector(`tr[data-adapter="${CSS.escape(info.name)}"]`)?.classList.add("fresh");
}

// ---------------------------------------------------------------------------------------------
// Evaluate: side A against side B under reward models, polled until it ends

/** @type {{id: string, stop: AbortController} | null} */
let evalWatching = null;

/** The adapters of the chosen model on both sides; side A starts on the newest of them. */
function fillEvalAdapters() {
  const model = select("ev-model").value;
  const fit = adapters.filter((a) => !a.base_model || a.base_model === model);
  /** @type {Array<[string, string]>} */
  const options = [["", "base model (none)"], ...fit.map((a) => /** @type {[string, string]} */ ([a.name, `${a.name} (${a.method})`]))];
  const sideA = select("ev-adapter-a");
  fillSelect(sideA, options);
  if (!sideA.dataset.touched && !sideA.value && fit.length) {
    sideA.value = fit.reduce((x, y) => (y.created_at > x.created_at ? y : x)).name;
  }
  fillSelect(select("ev-adapter-b"), options);
}

function onEvalModel() {
  const m = modelNamed(select("ev-model").value);
  const d = m?.defaults;
  input("ev-steps").placeholder = d ? String(d.steps) : "";
  input("ev-guidance").placeholder = d ? String(d.guidance_scale) : "";
  input("ev-width").placeholder = d ? String(d.width) : "";
  input("ev-height").placeholder = d ? String(d.height) : "";
  input("ev-strength").placeholder = d?.strength != null ? String(d.strength) : "";
  input("ev-image-guidance").placeholder = d?.image_guidance_scale != null ? String(d.image_guidance_scale) : "";
  fillSelect(select("ev-scheduler"), [
    ["", d ? `model default (${d.scheduler})` : "model default"],
    ...(m?.schedulers ?? []).map((s) => /** @type {[string, string]} */ ([s, s])),
  ]);
  // An edit model evaluates edits of input images; a text-to-image model that also edits may.
  const modes = EDIT_MODES.filter((x) => m?.modes.includes(x));
  const editOnly = !!m && !m.modes.includes("txt2img");
  const inputs = typed("ev-edit-fields", HTMLDetailsElement);
  inputs.hidden = modes.length === 0;
  if (editOnly) inputs.open = true;
  $("ev-edit-summary").textContent = editOnly
    ? "Input images: this model edits, one image for every prompt or one per prompt"
    : "Evaluate edits of input images instead (optional)";
  fillSelect(select("ev-mode"), modes.map((x) => [x, x]));
  fillEvalAdapters();
  onEvalMode();
}

function onEvalMode() {
  const mode = select("ev-mode").value;
  input("ev-strength").disabled = mode !== "img2img";
  input("ev-image-guidance").disabled = mode !== "instruct_pix2pix";
}

/** The reward checkboxes, from the rewards this server offers; a clear note when none. */
async function loadRewards() {
  const box = $("ev-rewards");
  const note = $("ev-rewards-note");
  const before = new Set(checkedRewards());
  const first = !box.querySelector("input");
  /** @type {string[]} */
  let names;
  try {
    names = (await api.rewards()).rewards;
  } catch (e) {
    box.querySelectorAll("label").forEach((l) => l.remove());
    note.hidden = false;
    note.textContent = e instanceof ApiError && e.code === "forbidden" ? `this key may not run evaluations: ${e.message}` : "could not list the reward models";
    if (e instanceof ApiError && e.code === "forbidden") return;
    throw e;
  }
  const boxes = names.map((name) => {
    const cb = h("input", { type: "checkbox", id: `ev-reward-${name}`, "data-testid": `ev-reward-${name}`, value: name });
    cb.checked = first || before.has(name);
    return h("label", { class: "check", for: `ev-reward-${name}` }, cb, name);
  });
  box.querySelectorAll("label").forEach((l) => l.remove());
  box.append(...boxes);
  note.hidden = names.length > 0;
  note.textContent = names.length
    ? ""
    : "This server offers no reward models, so it cannot evaluate: set clip_score, pickscore, aesthetic or hpsv2 under [rewards] in its configuration (a directory or a hub id) and restart it.";
  box.dataset.rewards = String(names.length);
  button("ev-submit").disabled = names.length === 0;
}

function checkedRewards() {
  return [...$("ev-rewards").querySelectorAll("input[type=checkbox]")].flatMap((el) =>
    el instanceof HTMLInputElement && el.checked ? [el.value] : [],
  );
}

/** @returns {Promise<EvaluateRequest>} */
async function evaluateRequest() {
  const prompts = textarea("ev-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  if (!prompts.length) throw new ApiError(0, "invalid_request", "write at least one prompt (one per line)");
  const rewards = checkedRewards();
  if (!rewards.length) throw new ApiError(0, "invalid_request", "check at least one reward model");
  const adapterA = text("ev-adapter-a");
  /** @type {EvaluateRequest} */
  const req = {
    model: text("ev-model"),
    adapter_a: adapterA,
    adapter_b: text("ev-adapter-b"),
    prompts,
    rewards,
    negative_prompt: text("ev-negative"),
    seeds: num("ev-seeds"),
    steps: num("ev-steps"),
    guidance_scale: num("ev-guidance"),
    width: num("ev-width"),
    height: num("ev-height"),
    scheduler: /** @type {Scheduler | undefined} */ (text("ev-scheduler")),
    tie_eps: num("ev-tie-eps"),
  };
  if (req.adapter_a || req.adapter_b) req.adapter_scale = num("ev-adapter-scale");
  const m = modelNamed(select("ev-model").value);
  const files = [...(input("ev-images").files ?? [])];
  if (m && !m.modes.includes("txt2img") && !files.length) {
    throw new ApiError(0, "invalid_request", `${m.name} edits images: choose an input image for every prompt, or one for all`);
  }
  if (files.length && !$("ev-edit-fields").hidden) {
    if (files.length !== 1 && files.length !== prompts.length) {
      throw new ApiError(0, "invalid_request", `${files.length} images for ${prompts.length} prompts: choose one image, or one per prompt`);
    }
    const b64 = await Promise.all(files.map(async (f) => {
      const url = await readAsDataUrl(f);
      return url.slice(url.indexOf(",") + 1);
    }));
    req.images = prompts.map((_, i) => b64[files.length === 1 ? 0 : i]);
    const mode = text("ev-mode");
    req.mode = mode;
    if (mode === "img2img") req.strength = num("ev-strength");
    if (mode === "instruct_pix2pix") req.image_guidance_scale = num("ev-image-guidance");
  }
  return req;
}

async function submitEvaluation() {
  const created = await api.evaluate(await evaluateRequest());
  await loadEvaluations();
  followEvaluation(created.evaluation);
}

/** @param {string | null | undefined} adapter */
const side = (adapter) => adapter || "base model";

/** @param {number} x a fraction */
const percent = (x) => `${(x * 100).toFixed(1)}%`;

/** @param {number} x */
const score = (x) => (Math.abs(x) >= 1000 || x === 0 ? String(Math.round(x * 1000) / 1000) : x.toPrecision(4));

/** Win rate ± the half-width of its 95% interval (none for n < 2). @param {RewardResult} r */
function winrateText(r) {
  return r.ci95 != null ? `${percent(r.winrate)} ± ${(r.ci95 * 100).toFixed(1)}` : percent(r.winrate);
}

/** One reward's result: the row's data attributes carry the numbers for scripts and tests. @param {string} name @param {RewardResult} r */
function resultRow(name, r) {
  // Set through the CSSOM: the page's Content-Security-Policy refuses style attributes.
  const fill = h("span");
  fill.style.width = `${(Math.min(Math.max(r.winrate, 0), 1) * 100).toFixed(1)}%`;
  const bar = h("span", { class: "winbar", title: `${percent(r.winrate)}; the tick is 50%` }, fill);
  const [a, b] = [h("td", { "data-field": "mean_a" }, score(r.mean_a)), h("td", { "data-field": "mean_b" }, score(r.mean_b))];
  if (r.mean_a !== r.mean_b) (r.mean_a > r.mean_b ? a : b).classList.add("better");
  const unpaired = r.unpaired ? `${winrateText(r.unpaired)} (n ${r.unpaired.n})` : "—";
  return h(
    "tr",
    { "data-reward": name, "data-winrate": String(r.winrate), "data-n": String(r.n) },
    h("td", {}, h("strong", {}, name)),
    h("td", { "data-field": "winrate" }, h("span", { class: "row" }, bar, winrateText(r))),
    h("td", { "data-field": "wins" }, `${r.wins} / ${r.ties} / ${r.losses}`),
    h("td", { "data-field": "n" }, String(r.n)),
    a,
    b,
    h("td", { "data-field": "unpaired" }, unpaired),
  );
}

/** @param {EvaluationRecord} rec */
function showEvaluation(rec) {
  const view = $("ev-view");
  view.hidden = false;
  view.dataset.id = rec.id;
  view.dataset.status = rec.status;
  $("ev-id").textContent = rec.id;
  const badge = $("ev-status");
  badge.textContent = rec.status;
  badge.dataset.status = rec.status;
  button("ev-cancel").hidden = EVAL_TERMINAL.includes(rec.status);
  const bar = typed("ev-progress", HTMLProgressElement);
  bar.max = Math.max(rec.total, 1);
  bar.value = rec.done;
  bar.title = `${rec.done} of ${rec.total} images`;
  const s = rec.spec;
  const nPrompts = (s.prompts ?? []).length;
  const detail = [
    `A: ${side(s.adapter_a)} vs B: ${side(s.adapter_b)} on ${s.model ?? "the default model"}`,
    `${nPrompts} prompt${nPrompts === 1 ? "" : "s"} × ${s.seeds ?? 1} seed${(s.seeds ?? 1) === 1 ? "" : "s"}`,
    `${rec.done} of ${rec.total} images`,
  ];
  if (rec.error) detail.push(`${rec.error.code}: ${rec.error.message}`);
  $("ev-detail").textContent = detail.join(" · ");
  const result = Object.entries(rec.result ?? {});
  $("ev-results").replaceChildren(...result.map(([name, r]) => resultRow(name, r)));
  $("ev-result").hidden = rec.status !== "completed" || result.length === 0;
  $("evaluations").querySelector(`tr[data-evaluation-id="${CSS.escape(rec.id)}"]`)?.replaceWith(evaluationRow(rec));
  if (rec.status === "failed" && rec.error) showError(new ApiError(0, rec.error.code, rec.error.message));
}

/**
 * Follows an evaluation: asks for it every EVAL_POLL_MS until it ends. A few network failures
 * in a row are waited out; any other error ends the following and is shown.
 * @param {EvaluationRecord} rec
 */
async function followEvaluation(rec) {
  evalWatching?.stop.abort();
  const stop = new AbortController();
  evalWatching = { id: rec.id, stop };
  const view = $("ev-view");
  view.dataset.watching = "live";
  showEvaluation(rec);
  let failures = 0;
  try {
    while (!EVAL_TERMINAL.includes(rec.status)) {
      await new Promise((r) => setTimeout(r, EVAL_POLL_MS * (1 + failures)));
      if (stop.signal.aborted) return;
      try {
        rec = await api.evaluation(rec.id, stop.signal);
        failures = 0;
      } catch (e) {
        if (e instanceof ApiError && e.status === 0 && ++failures < 10) continue;
        throw e;
      }
      if (stop.signal.aborted) return;
      showEvaluation(rec);
    }
    await loadEvaluations();
  } catch (e) {
    showError(e);
  } finally {
    if (evalWatching?.stop === stop) view.dataset.watching = "done";
  }
}

/** The per-image rows need the key, so they are fetched and saved as a blob. @param {string} id */
async function downloadRows(id) {
  const res = await api.evaluationRows(id);
  const body = await res.text();
  /** @type {EvaluationRow[]} */
  const rows = JSON.parse(body);
  saveBlob(new Blob([body], { type: "application/json" }), `evaluation-${id}-rows.json`);
  button("ev-download-rows").title = `${rows.length} rows saved`;
}

/** @param {EvaluationRecord} e */
function evaluationRow(e) {
  const show = h("button", { type: "button", class: "small", "data-testid": "evaluation-show" }, "Show");
  show.addEventListener("click", () => followEvaluation(e));
  const rewards = e.result
    ? Object.entries(e.result).map(([name, r]) => `${name} ${percent(r.winrate)}`).join(", ")
    : e.spec.rewards.join(", ");
  return h(
    "tr",
    { "data-evaluation-id": e.id, "data-status": e.status },
    h("td", {}, h("code", { title: e.id }, e.id.slice(0, 8))),
    h("td", {}, h("span", { class: "badge", "data-status": e.status }, e.status)),
    h("td", {}, e.spec.model ?? "default"),
    h("td", {}, side(e.spec.adapter_a)),
    h("td", {}, side(e.spec.adapter_b)),
    h("td", {}, `${e.done}/${e.total}`),
    h("td", {}, rewards),
    h("td", {}, when(e.created_at)),
    h("td", {}, show),
  );
}

/** Past evaluations, newest first. */
async function loadEvaluations() {
  /** @type {EvaluationRecord[]} */
  let list;
  try {
    list = await api.evaluations();
  } catch (e) {
    if (!(e instanceof ApiError && e.code === "forbidden")) throw e;
    $("evaluations").replaceChildren(h("tr", {}, h("td", { colspan: "9", class: "muted" }, `this key may not run evaluations: ${e.message}`)));
    return;
  }
  const rows = [...list].reverse().map(evaluationRow);
  $("evaluations").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "9", class: "muted" }, "no evaluations yet"))]));
}

// ---------------------------------------------------------------------------------------------
// Tabs, key, start-up

/** @param {string} name */
function showTab(name) {
  for (const tab of document.querySelectorAll("[data-tab]")) {
    if (tab instanceof HTMLElement) tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll("[data-panel]")) {
    if (panel instanceof HTMLElement) panel.hidden = panel.dataset.panel !== name;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "finetune") drawChart();
}

/** Everything that depends on the key, loaded again when it changes. */
async function reload() {
  clearError();
  const results = await Promise.allSettled([loadModels(), loadAdapters(), loadJobs(), loadRewards(), loadEvaluations()]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && failed.status === "rejected") showError(failed.reason);
  document.body.dataset.ready = "true";
}

function start() {
  for (const tab of document.querySelectorAll("[data-tab]")) {
    if (tab instanceof HTMLElement) tab.addEventListener("click", () => showTab(tab.dataset.tab ?? "generate"));
  }
  const initial = location.hash.slice(1);
  showTab(["generate", "edit", "finetune", "adapters", "evaluate"].includes(initial) ? initial : "generate");

  const key = input("api-key");
  key.value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = key.value.trim();
    if (v) localStorage.setItem(KEY_STORAGE, v);
    else localStorage.removeItem(KEY_STORAGE);
    reload();
  });
  button("error-close").addEventListener("click", clearError);

  select("gen-model").addEventListener("change", onGenerateModel);
  button("gen-seed-random").addEventListener("click", () => (input("gen-seed").value = String(randomSeed())));
  $("generate-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busyWhile(button("gen-submit"), $("gen-busy"), generate);
  });
  button("gallery-clear").addEventListener("click", () => $("gallery").replaceChildren());

  select("edit-model").addEventListener("change", onEditModel);
  select("edit-mode").addEventListener("change", onEditMode);
  button("edit-seed-random").addEventListener("click", () => (input("edit-seed").value = String(randomSeed())));
  input("edit-file").addEventListener("change", async () => {
    const f = input("edit-file").files?.[0];
    if (f) setEditSource(await readAsDataUrl(f));
  });
  $("edit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busyWhile(button("edit-submit"), $("edit-busy"), edit);
  });

  fillSelect(select("ft-method"), [["", "model default"], ...METHODS]);
  $("ft-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busyWhile(button("ft-submit"), null, submitJob);
  });
  button("job-cancel").addEventListener("click", async () => {
    if (!watching) return;
    try {
      showJob(await api.cancel(watching.id));
    } catch (e) {
      showError(e);
    }
  });
  $("upload-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busyWhile(button("upload-submit"), null, uploadAdapter);
  });
  select("ev-model").addEventListener("change", onEvalModel);
  select("ev-mode").addEventListener("change", onEvalMode);
  select("ev-adapter-a").addEventListener("change", () => (select("ev-adapter-a").dataset.touched = "true"));
  $("ev-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busyWhile(button("ev-submit"), null, submitEvaluation);
  });
  button("ev-cancel").addEventListener("click", async () => {
    if (!evalWatching) return;
    try {
      showEvaluation(await api.cancelEvaluation(evalWatching.id));
    } catch (e) {
      showError(e);
    }
  });
  button("ev-download-rows").addEventListener("click", () => {
    const id = $("ev-view").dataset.id;
    if (id) busyWhile(button("ev-download-rows"), null, () => downloadRows(id));
  });
  button("evaluations-refresh").addEventListener("click", () => loadEvaluations().catch(showError));
  button("jobs-refresh").addEventListener("click", () => loadJobs().catch(showError));
  button("adapters-refresh").addEventListener("click", () => loadAdapters().catch(showError));
  window.addEventListener("resize", () => drawChart());

  loadHealth();
  reload();
}

start();
