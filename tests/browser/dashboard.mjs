// Opens the dashboard in headless Chromium and drives every view and button
// against a real server:
// - Jobs: a submitted job appears and turns completed live (through the
//   page's event stream, without reloading), with live progress; Cancel and
//   Retry work; the status filter and paging narrow the list.
// - Job detail: phases with pinned versions, outputs, resource use, attempt
//   errors and a timeline of events; Retry from start works.
// - Queue: counts per status, Pause and Resume, the throughput chart, the
//   concurrency limits and keys; a key opens the job list filtered by it;
//   the plugins with limits.
// - Plugins: versions with hash and size; Activate and Roll back, each after
//   a confirmation; grants set through the API show live.
// - Schedules: a schedule made through the API shows its next tick; Trigger,
//   Pause and Resume work.
// With a token, the page first says it needs one, then works once it is
// typed in; with a read-only token it shows everything and says so when a
// button needs more. Any content-security policy violation fails the test.
// Leaves a screenshot of each view.
//
//   node dashboard.mjs <server url> <screenshot prefix> [admin token] [read token]
import { chromium } from "playwright-core";

const [url, shots, token, readToken] = process.argv.slice(2);
const auth = token ? { authorization: "Bearer " + token } : {};
const call = async (method, path, body, expected) => {
  const response = await fetch(url + path, {
    method, headers: { "content-type": "application/json", ...auth }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status !== expected) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return response.status === 204 ? null : response.json();
};
const submit = spec => call("POST", "/jobs", spec, 201);
const step = text => console.log("ok:", text);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("pageerror", error => { console.error("page error:", error); process.exitCode = 1; });
  page.on("console", message => {
    if (message.text().includes("Content Security Policy")) {
      console.error("policy violation:", message.text());
      process.exitCode = 1;
    }
  });
  const dialogs = [];
  page.on("dialog", dialog => { dialogs.push(dialog.message()); dialog.accept(); });
  const typeToken = async value => {
    await page.locator("#token").fill(value);
    await page.locator("#token").dispatchEvent("change");
  };
  const shoot = async name => page.screenshot({ path: `${shots}-${name}.png`, fullPage: true });

  await page.goto(url);
  if (token) {
    await page.locator("#message", { hasText: "needs a token" }).waitFor({ timeout: 10000 });
    await typeToken(token);
    step("the page asked for a token and got one");
  }
  await page.locator("#live.on").waitFor({ timeout: 10000 });

  // ---- Jobs ----
  const job = await submit({ phases: [
    { name: "warm-up", plugin: "sleep", config: { ms: 600, steps: 6 } },
    { name: "report", plugin: "echo" },
  ], payload: { n: 1 } });
  const row = page.locator(`#jobs tr[data-job="${job.id}"]`);
  await row.waitFor({ timeout: 10000 });
  await row.locator('.phase[data-phase="warm-up"] .note', { hasText: "step" }).waitFor({ timeout: 10000 });
  await page.locator(`#jobs tr[data-job="${job.id}"][data-status="completed"]`).waitFor({ timeout: 20000 });
  step("a job appeared, showed live progress and turned completed live");

  const later = await submit({ phases: [{ name: "later", plugin: "echo" }], delay_ms: 3600000 });
  const laterRow = page.locator(`#jobs tr[data-job="${later.id}"]`);
  await laterRow.locator("button", { hasText: "Cancel" }).click();
  await page.locator(`#jobs tr[data-job="${later.id}"][data-status="cancelled"]`).waitFor({ timeout: 10000 });
  await laterRow.locator("button", { hasText: "Retry" }).first().waitFor();
  step("Cancel from the list worked, and Retry appeared");

  await page.locator("#filter-status").selectOption("cancelled");
  await page.locator("#filter-apply").click();
  await page.locator(`#jobs tr[data-job="${job.id}"]`).waitFor({ state: "detached", timeout: 10000 });
  await laterRow.waitFor();
  await page.locator("#filter-status").selectOption("");
  await page.locator("#filter-apply").click();
  await row.waitFor();
  step("the status filter narrowed the list");
  await shoot("jobs");

  // ---- Job detail ----
  await row.locator("a").click();
  await page.locator(`#job-id`, { hasText: job.id }).waitFor();
  const report = page.locator('#job-phases tr[data-phase="report"]');
  await report.locator("td", { hasText: "echo@1.0.0" }).waitFor();
  await report.locator("pre.output").waitFor();
  await report.locator(".usage", { hasText: "ms" }).waitFor();
  await page.locator('#job-timeline li[data-type="job:completed"]').waitFor({ timeout: 10000 });
  await page.locator('#job-timeline li[data-type="job:phase:started"]').first().waitFor();
  step("the job's page shows pinned versions, output, resource use and its timeline");
  await shoot("job");
  const waiting = await submit({ phases: [{ name: "later", plugin: "echo" }], delay_ms: 3600000 });
  await page.goto(url + "/#job/" + waiting.id);
  await page.locator("#job-id", { hasText: waiting.id }).waitFor();
  await page.locator('#job-actions button[data-action="Cancel"]').click();
  await page.locator('#view-job[data-status="cancelled"]').waitFor({ timeout: 10000 });
  await page.locator('#job-timeline li[data-type="job:cancelled"]').waitFor({ timeout: 10000 });
  await page.locator('#job-actions button[data-action="Retry from start"]').click();
  await page.locator('#job-timeline li[data-type="job:retrying"]').waitFor({ timeout: 10000 });
  await page.locator('#view-job[data-status="completed"]').waitFor({ timeout: 10000 });
  step("Cancel and Retry from start worked from the job's page");

  // ---- Queue ----
  await page.locator('nav a[data-view="queue"]').click();
  await page.locator('#queue-counts [data-count="completed"] b').waitFor();
  const completed = Number(await page.locator('#queue-counts [data-count="completed"] b').textContent());
  if (completed < 1) throw new Error("no completed job counted");
  await page.locator("#hosts tr[data-host]", { hasText: "serving" }).waitFor();
  await page.locator("#queue-pause").click();
  await page.locator('#view-queue[data-paused="true"]').waitFor({ timeout: 10000 });
  await page.locator("#hosts tr[data-host]", { hasText: "paused" }).waitFor({ timeout: 10000 });
  await page.locator("#queue-resume").click();
  await page.locator('#view-queue[data-paused="false"]').waitFor({ timeout: 10000 });
  for (let i = 0; i < 5; i++) await submit({ phases: [{ name: "burst", plugin: "echo" }] });
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.total) >= 5, null, { timeout: 10000 });
  step("the queue shows counts, pauses and resumes, and charts completions");
  await call("PUT", "/queue/concurrency", { default: 4, keys: { "tenant-*": 2 } }, 200);
  const keyed = await submit({ phases: [{ name: "later", plugin: "echo" }], delay_ms: 3600000, concurrency_key: "tenant-7" });
  // The job's event refreshes the view.
  await page.locator("#key-limits", { hasText: "tenant-* 2, default 4" }).waitFor({ timeout: 10000 });
  const keyRow = page.locator('#keys tr[data-key="tenant-7"]');
  await keyRow.locator("td", { hasText: /^2$/ }).waitFor();
  await shoot("queue");
  await keyRow.locator("a").click();
  await page.locator(`#jobs tr[data-job="${keyed.id}"]`).waitFor({ timeout: 10000 });
  await page.locator(`#jobs tr[data-job="${job.id}"]`).waitFor({ state: "detached", timeout: 10000 });
  await page.locator("#filter-key").fill("");
  await page.locator("#filter-apply").click();
  await row.waitFor();
  step("the queue lists limits and keys, and a key filters the job list");
  await call("PUT", "/plugins/echo/resources", { max_running: 8, per_second: 1000 }, 200);
  await page.locator('nav a[data-view="queue"]').click();
  await submit({ phases: [{ name: "limited", plugin: "echo" }] });
  await page.locator('#plugin-loads tr[data-plugin="echo"] td', { hasText: "at most 8 running, 1000 starts/s" })
    .waitFor({ timeout: 10000 });
  step("the queue lists the plugins with limits");

  // ---- Plugins ----
  await page.locator('nav a[data-view="plugins"]').click();
  const echo = page.locator('.plugin[data-plugin="echo"]');
  await echo.locator('tr[data-version="2.0.0"] td.mono').waitFor();
  await echo.locator('tr[data-version="2.0.0"] button', { hasText: "Activate" }).click();
  await echo.locator(".active-version", { hasText: "2.0.0" }).waitFor({ timeout: 10000 });
  await echo.locator('tr[data-version="1.0.0"] button', { hasText: "Roll back" }).click();
  await echo.locator(".active-version", { hasText: "1.0.0" }).waitFor({ timeout: 10000 });
  if (dialogs.length !== 2 || !dialogs[0].includes("Make echo 2.0.0 the active version?")) {
    throw new Error("activation asked no confirmation: " + JSON.stringify(dialogs));
  }
  await call("PUT", "/plugins/echo/grants",
    { versions: ["1.0.0"], config: { region: "eu" }, secrets: ["api_key"], http: ["https://api.example.com"] }, 200);
  await echo.locator(".grants", { hasText: "grants for 1.0.0: config region; secrets api_key; http https://api.example.com; at most 8 running, 1000 starts/s" })
    .waitFor({ timeout: 10000 });
  step("Activate and Roll back worked after a confirmation; grants showed live");
  await shoot("plugins");

  // ---- Schedules ----
  await call("POST", "/schedules", { name: "nightly", cron: "30 2 * * *", timezone: "Europe/Berlin",
    job: { phases: [{ name: "report", plugin: "echo" }] } }, 201);
  await page.locator('nav a[data-view="schedules"]').click();
  const nightly = page.locator('#schedules tr[data-schedule="nightly"]');
  await nightly.locator("td", { hasText: "30 2 * * * (Europe/Berlin)" }).waitFor({ timeout: 10000 });
  await nightly.locator(".last-fire", { hasText: "never" }).waitFor();
  await nightly.locator("button", { hasText: "Trigger" }).click();
  await nightly.locator(".last-fire .status.completed").waitFor({ timeout: 10000 });
  await nightly.locator("button", { hasText: "Pause" }).click();
  await page.locator('#schedules tr[data-schedule="nightly"][data-paused="true"]').waitFor({ timeout: 10000 });
  await nightly.locator("button", { hasText: "Resume" }).click();
  await page.locator('#schedules tr[data-schedule="nightly"][data-paused="false"]').waitFor({ timeout: 10000 });
  step("Trigger, Pause and Resume worked on a schedule");
  await shoot("schedules");

  // ---- A read-only token: everything shows, buttons say what they need ----
  if (readToken) {
    await typeToken(readToken);
    await page.locator("#live.on").waitFor({ timeout: 10000 });
    await nightly.locator("button", { hasText: "Trigger" }).click();
    await page.locator("#message", { hasText: "Trigger failed: this route needs a token of scope `admin`" }).waitFor({ timeout: 10000 });
    await page.locator('nav a[data-view="jobs"]').click();
    await laterRow.locator("button", { hasText: "Retry" }).first().click();
    await page.locator("#message", { hasText: "needs a token of scope `submit`" }).waitFor({ timeout: 10000 });
    step("a read token sees every view, and a button it may not use says which scope it needs");
  }
} finally {
  await browser.close();
}
