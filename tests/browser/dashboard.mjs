// Opens the dashboard in headless Chromium, submits a job through the API,
// and checks that it appears on the page and turns completed live (through
// the page's event stream, without reloading). With a token, the page first
// says it needs one, then works once it is typed in. Any content-security
// policy violation fails the test. Grants set through the API show on the
// page. Saves a screenshot.
//
//   node dashboard.mjs <server url> <screenshot.png> [token]
import { chromium } from "playwright-core";

const [url, screenshot, token] = process.argv.slice(2);
const auth = token ? { authorization: "Bearer " + token } : {};
const submit = async spec => {
  const response = await fetch(url + "/jobs", {
    method: "POST", headers: { "content-type": "application/json", ...auth }, body: JSON.stringify(spec),
  });
  if (response.status !== 201) throw new Error("submit failed: " + response.status);
  return response.json();
};
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  page.on("pageerror", error => { console.error("page error:", error); process.exitCode = 1; });
  page.on("console", message => {
    if (message.text().includes("Content Security Policy")) {
      console.error("policy violation:", message.text());
      process.exitCode = 1;
    }
  });
  await page.goto(url);
  if (token) {
    await page.locator("#message", { hasText: "needs a token" }).waitFor({ timeout: 10000 });
    await page.locator("#token").fill(token);
    await page.locator("#token").dispatchEvent("change");
    console.log("the page asked for a token and got one");
  }
  await page.locator("#live.on").waitFor({ timeout: 10000 });
  await page.locator(".plugin", { hasText: "sleep" }).waitFor();
  // Grants set through the API show on the page live, by name.
  const granted = await fetch(url + "/plugins/echo/grants", {
    method: "PUT", headers: { "content-type": "application/json", ...auth },
    body: JSON.stringify({ versions: ["1.0.0"], config: { region: "eu" }, secrets: ["api_key"], http: ["https://api.example.com"] }),
  });
  if (granted.status !== 200) throw new Error("setting grants failed: " + granted.status);
  await page.locator(".plugin", { hasText: "echo" })
    .locator(".grants", { hasText: "grants for 1.0.0: config region; secrets api_key; http https://api.example.com" }).waitFor({ timeout: 10000 });
  console.log("the plugin's grants showed live");
  // This host, serving, in the hosts table.
  await page.locator("#hosts tr[data-host]", { hasText: "serving" }).waitFor();

  const job = await submit({ phases: [
    { name: "warm-up", plugin: "sleep", config: { ms: 600, steps: 6 } },
    { name: "report", plugin: "echo" },
  ] });
  const row = page.locator(`tr[data-job="${job.id}"]`);
  await row.waitFor({ timeout: 10000 });
  console.log("the job appeared on the page with status", await row.getAttribute("data-status"));
  // Live progress reaches the page while the first phase runs.
  await row.locator('.phase[data-phase="warm-up"] .note', { hasText: "step" }).waitFor({ timeout: 10000 });
  await page.locator(`tr[data-job="${job.id}"][data-status="completed"]`).waitFor({ timeout: 20000 });
  console.log("the job turned completed live");

  // A failing job shows a Retry button; a scheduled one a Cancel button that works.
  const later = await submit({ phases: [{ name: "later", plugin: "echo" }], delay_ms: 3600000 });
  const laterRow = page.locator(`tr[data-job="${later.id}"]`);
  await laterRow.locator("button", { hasText: "Cancel" }).click();
  await page.locator(`tr[data-job="${later.id}"][data-status="cancelled"]`).waitFor({ timeout: 10000 });
  await laterRow.locator("button", { hasText: "Retry" }).waitFor();
  console.log("cancel from the page worked");

  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("screenshot:", screenshot);
} finally {
  await browser.close();
}
