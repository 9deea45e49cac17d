// Drives the web UI in headless Chromium against a running server, as a person would: enters
// the API key, generates an image, edits it, fine-tunes an adapter while the chart draws, finds
// the adapter in the list, downloads it and uploads the file again under another name, and
// evaluates the adapter against the base model under two reward models.
// tests/web_ui.rs starts the server and runs this script.
//
// usage: node tests/web/ui.test.mjs <base-url> <api-key> <dataset-url> <screenshot-dir>

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";

const [base, key, datasetUrl, shots] = process.argv.slice(2);
if (!base || !key || !datasetUrl || !shots) {
  console.error("usage: ui.test.mjs <base-url> <api-key> <dataset-url> <screenshot-dir>");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

// A fresh profile each run: nothing cached or stored (the key in localStorage included) leaks
// from one run into the next.
const profile = mkdtempSync(join(tmpdir(), "dspo-ui-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1200, height: 900 },
  deviceScaleFactor: 1,
  acceptDownloads: true,
});

/** What the page logs or throws is part of the test's output: a failing step shows why. */
const problems = [];
const page = browser.pages()[0] ?? (await browser.newPage());
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  if (m.type() === "error") problems.push(`console: ${m.text()}`);
});

const step = (name) => console.log(`ui: ${name}`);
const byTest = (id) => page.getByTestId(id);

/** Fails with the page's error banner, when it shows one, instead of a bare timeout. */
async function waitFor(what, fn, timeout) {
  try {
    await fn();
  } catch (e) {
    const banner = await byTest("error").isVisible() ? await byTest("error").innerText() : "(no error shown)";
    await page.screenshot({ path: join(shots, `failed-${what.replace(/\W+/g, "-")}.png`) });
    throw new Error(`waiting for ${what}: ${e.message}\npage error banner: ${banner}\n${problems.join("\n")}`);
  }
}

try {
  step("open the page");
  await page.goto(base + "/", { waitUntil: "load" });
  assert.equal(await page.title(), "dspo-server");

  // Without a key the API refuses and the page says so with the server's own error code.
  await waitFor("the 401 banner", () => page.locator('#error[data-code="unauthorized"]').waitFor({ timeout: 15_000 }));

  step("enter the API key");
  await byTest("api-key").fill(key);
  await byTest("api-key-save").click();
  await waitFor("the models", () => page.locator('#gen-model option[value="tiny-sd15"]').waitFor({ state: "attached", timeout: 15_000 }));
  assert.equal(await byTest("error").isVisible(), false, "the error banner goes once the key works");
  assert.equal(await page.evaluate(() => localStorage.getItem("dspo-server.api-key")), key);
  // Chromium logs the refused calls of the keyless start as console errors; from here on the
  // page must log none.
  problems.length = 0;
  // The InstructPix2Pix model cannot do txt2img, so only the Edit tab offers it.
  assert.equal(await page.locator('#gen-model option[value="tiny-ip2p"]').count(), 0);

  step("generate");
  await byTest("gen-model").selectOption("tiny-sd15");
  await byTest("gen-prompt").fill("a red circle on a white background");
  await byTest("gen-steps").fill("2");
  await byTest("gen-width").fill("64");
  await byTest("gen-height").fill("64");
  await byTest("gen-seed").fill("1234");
  await byTest("gen-num-images").fill("2");
  await byTest("gen-submit").click();
  const images = page.locator('#gallery img[data-testid="gallery-image"]');
  await waitFor("two generated images", () => images.nth(1).waitFor({ timeout: 120_000 }));
  const seeds = await images.evaluateAll((els) => els.map((e) => e.getAttribute("data-seed")).sort());
  assert.deepEqual(seeds, ["1234", "1235"], "image i has seed + i");
  const first = page.locator('#gallery [data-testid="gallery-card"][data-seed="1234"]');
  const img = first.locator("img");
  assert.match(await img.getAttribute("src"), /^data:image\/png;base64,iVBORw0KGgo/);
  await img.evaluate((el) => (el.complete ? null : new Promise((r) => el.addEventListener("load", r))));
  const size = await img.evaluate((el) => [el.naturalWidth, el.naturalHeight]);
  assert.deepEqual(size, [64, 64], "the PNG decodes at the requested size");
  assert.equal(await first.locator('dd[data-field="seed"]').innerText(), "1234");
  assert.equal(await first.locator('dd[data-field="steps"]').innerText(), "2");
  await page.screenshot({ path: join(shots, "generate.png") });

  step("reuse the image in Edit");
  await first.getByTestId("reuse").click();
  await waitFor("the edit tab", () => byTest("edit-source").waitFor({ state: "visible", timeout: 5_000 }));
  assert.match(await byTest("edit-source").getAttribute("src"), /^data:image\/png;base64,/);
  await byTest("edit-model").selectOption("tiny-ip2p");
  assert.equal(await byTest("edit-mode").inputValue(), "instruct_pix2pix");
  await byTest("edit-prompt").fill("make the circle blue");
  await byTest("edit-steps").fill("2");
  await byTest("edit-image-guidance").fill("1.5");
  await byTest("edit-seed").fill("7");
  await byTest("edit-submit").click();
  const edited = page.locator('#edit-gallery img[data-testid="gallery-image"]');
  await waitFor("the edited image", () => edited.first().waitFor({ timeout: 120_000 }));
  assert.equal(await edited.first().getAttribute("data-seed"), "7");
  assert.equal(await edited.first().getAttribute("data-width"), "64", "an edit keeps the input's size");
  assert.equal(
    await page.locator('#edit-gallery [data-testid="gallery-card"] dd[data-field="mode"]').first().innerText(),
    "instruct_pix2pix",
  );
  await page.screenshot({ path: join(shots, "edit.png") });

  step("fine-tune");
  await byTest("tab-finetune").click();
  await byTest("ft-dataset-url").fill(datasetUrl);
  await byTest("ft-base-model").selectOption("tiny-sd15");
  await byTest("ft-method").selectOption("dspo");
  await byTest("ft-adapter-name").fill("ui-centred");
  await byTest("ft-rank").fill("4");
  await byTest("ft-alpha").fill("8");
  await byTest("ft-target-modules").fill("to_q, to_k, to_v, to_out.0");
  await byTest("ft-max-steps").fill("3");
  await byTest("ft-batch-size").fill("2");
  await byTest("ft-max-pairs").fill("16");
  await byTest("ft-learning-rate").fill("0.01");
  await byTest("ft-beta").fill("1");
  await byTest("ft-resolution").fill("64");
  await byTest("ft-warmup-steps").fill("0");
  await byTest("ft-checkpoint-every").fill("2");
  await byTest("ft-submit").click();
  await waitFor("the job view", () => byTest("job-view").waitFor({ state: "visible", timeout: 15_000 }));
  const jobId = (await byTest("job-id").innerText()).trim();
  assert.match(jobId, /\S/);
  await waitFor("the job to complete", () =>
    page.locator('#job-view[data-status="completed"][data-watching="done"]').waitFor({ timeout: 300_000 }),
  );
  const plotted = Number(await byTest("chart").getAttribute("data-points"));
  assert.equal(plotted, 3, "one loss point per optimiser step");
  assert.equal(Number(await byTest("chart").getAttribute("data-accuracy-points")), 3, "DSPO reports implicit accuracy");
  // Something was drawn: the canvas is not blank.
  const inked = await byTest("chart").evaluate((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  });
  assert.ok(inked > 500, `the chart has ink (${inked} pixels)`);
  await waitFor("the job in the list", () =>
    page.locator(`#jobs tr[data-job-id="${jobId}"][data-status="completed"]`).waitFor({ timeout: 15_000 }),
  );
  await page.screenshot({ path: join(shots, "finetune.png") });

  step("the adapter is listed");
  await byTest("tab-adapters").click();
  const row = page.locator('#adapters tr[data-adapter="ui-centred"]');
  await waitFor("the adapter row", () => row.waitFor({ timeout: 15_000 }));
  assert.match(await row.innerText(), /tiny-sd15/);
  assert.match(await row.innerText(), /dspo/);
  const [download] = await Promise.all([page.waitForEvent("download"), row.getByTestId("adapter-download").click()]);
  assert.equal(download.suggestedFilename(), "ui-centred.safetensors");

  step("upload the downloaded file as another adapter");
  await byTest("upload-name").fill("ui-uploaded");
  await byTest("upload-model").selectOption("tiny-sd15");
  await byTest("upload-file").setInputFiles(await download.path());
  await byTest("upload-submit").click();
  await waitFor("the uploaded adapter", () =>
    page.locator('#adapters tr[data-adapter="ui-uploaded"]').waitFor({ timeout: 30_000 }),
  );
  await page.screenshot({ path: join(shots, "adapters.png") });

  step("generate with the adapter");
  await row.getByTestId("adapter-use").click();
  assert.equal(await byTest("gen-adapter").inputValue(), "ui-centred");
  await byTest("gen-num-images").fill("1");
  await byTest("gen-submit").click();
  const tuned = page.locator('#gallery [data-testid="gallery-card"]').first();
  await waitFor("the adapter's image", () =>
    tuned.locator('dd[data-field="adapter"]').waitFor({ timeout: 120_000 }),
  );
  assert.match(await tuned.locator('dd[data-field="adapter"]').innerText(), /^ui-centred/);

  step("evaluate the adapter against the base model");
  await byTest("tab-evaluate").click();
  await waitFor("the reward checkboxes", () => byTest("ev-reward-aesthetic").waitFor({ timeout: 15_000 }));
  assert.equal(await byTest("ev-rewards-note").isVisible(), false, "no note while the server offers rewards");
  await byTest("ev-model").selectOption("tiny-sd15");
  await byTest("ev-adapter-a").selectOption("ui-centred");
  assert.equal(await byTest("ev-adapter-b").inputValue(), "", "side B starts on the base model");
  await byTest("ev-prompts").fill("a red circle on a white background\na blue square on a green background");
  await byTest("ev-seeds").fill("2");
  await byTest("ev-steps").fill("2");
  await byTest("ev-reward-clip_score").check();
  await byTest("ev-reward-aesthetic").check();
  await byTest("ev-submit").click();
  await waitFor("the evaluation view", () => byTest("ev-view").waitFor({ state: "visible", timeout: 15_000 }));
  const evalId = (await byTest("ev-id").innerText()).trim();
  assert.match(evalId, /\S/);
  await waitFor("the evaluation to complete", () =>
    page.locator('#ev-view[data-status="completed"][data-watching="done"]').waitFor({ timeout: 300_000 }),
  );
  // 2 prompts × 2 seeds × 2 sides.
  assert.deepEqual(await byTest("ev-progress").evaluate((p) => [p.value, p.max]), [8, 8]);
  assert.equal(await page.locator("#ev-results tr").count(), 2, "one row per reward");
  for (const reward of ["clip_score", "aesthetic"]) {
    const r = page.locator(`#ev-results tr[data-reward="${reward}"]`);
    await waitFor(`the ${reward} result`, () => r.waitFor({ timeout: 5_000 }));
    const shown = await r.locator('td[data-field="winrate"]').innerText();
    const pct = Number(/^(\d+(?:\.\d+)?)%/.exec(shown.trim())?.[1]);
    assert.ok(pct >= 0 && pct <= 100, `${reward}: a win rate in percent (${shown})`);
    assert.match(shown, /± \d/, `${reward}: with its 95% interval (${shown})`);
    assert.equal(await r.locator('td[data-field="n"]').innerText(), "4", `${reward}: 2 prompts × 2 seeds`);
    const [w, t, l] = (await r.locator('td[data-field="wins"]').innerText()).split("/").map(Number);
    assert.equal(w + t + l, 4, `${reward}: wins, ties and losses add up to n`);
    assert.ok(Math.abs(Number(await r.getAttribute("data-winrate")) * 100 - pct) < 0.06, `${reward}: the shown percentage is the win rate`);
    assert.match(await r.locator('td[data-field="unpaired"]').innerText(), /%/, `${reward}: 2 seeds give an unpaired win rate`);
  }
  await waitFor("the evaluation in the list", () =>
    page.locator(`#evaluations tr[data-evaluation-id="${evalId}"][data-status="completed"]`).waitFor({ timeout: 15_000 }),
  );
  const [rowsFile] = await Promise.all([page.waitForEvent("download"), byTest("ev-download-rows").click()]);
  assert.equal(rowsFile.suggestedFilename(), `evaluation-${evalId}-rows.json`);
  const evalRows = JSON.parse(readFileSync(await rowsFile.path(), "utf8"));
  assert.equal(evalRows.length, 4, "one row per prompt and seed");
  for (const row of evalRows) {
    assert.deepEqual(Object.keys(row.scores).sort(), ["aesthetic", "clip_score"]);
    assert.equal(row.scores.clip_score.length, 2, "A's and B's score");
  }
  await byTest("ev-view").scrollIntoViewIfNeeded();
  await page.screenshot({ path: join(shots, "evaluate.png") });

  step("cancel a long evaluation");
  await byTest("ev-prompts").fill(Array.from({ length: 40 }, (_, i) => `a red circle number ${i}`).join("\n"));
  await byTest("ev-seeds").fill("8");
  await byTest("ev-steps").fill("20");
  await byTest("ev-reward-aesthetic").uncheck();
  await byTest("ev-submit").click();
  await waitFor("the long evaluation", () =>
    page.locator(`#ev-view:not([data-id="${evalId}"])[data-watching="live"]`).waitFor({ timeout: 15_000 }),
  );
  const longId = await byTest("ev-view").getAttribute("data-id");
  assert.deepEqual(await byTest("ev-progress").evaluate((p) => p.max), 40 * 8 * 2);
  await byTest("ev-cancel").click();
  await waitFor("the cancelled evaluation", () =>
    page.locator('#ev-view[data-status="cancelled"][data-watching="done"]').waitFor({ timeout: 60_000 }),
  );
  assert.equal(await byTest("ev-cancel").isVisible(), false, "nothing left to cancel");
  assert.equal(await byTest("ev-result").isVisible(), false, "a cancelled evaluation has no results");
  assert.ok((await byTest("ev-progress").evaluate((p) => p.value)) < 40 * 8 * 2, "it stopped early");
  await waitFor("the cancelled evaluation in the list", () =>
    page.locator(`#evaluations tr[data-evaluation-id="${longId}"][data-status="cancelled"]`).waitFor({ timeout: 15_000 }),
  );

  assert.deepEqual(problems, [], "the page logged no errors");
  console.log("web ui ok");
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
