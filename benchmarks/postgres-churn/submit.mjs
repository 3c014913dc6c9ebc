// Submits N trivial one-phase `echo` jobs to a jobhost server, 64 requests
// in flight, over keep-alive connections; fails on any refusal.
const [base, total] = [process.argv[2], Number(process.argv[3])];
const inFlight = 64;
const body = JSON.stringify({ phases: [{ name: "echo", plugin: "echo" }], payload: { n: 1 } });
let sent = 0;
async function submitter() {
  while (sent < total) {
    sent += 1;
    const response = await fetch(`${base}/jobs`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    if (response.status === 429 || response.status === 503) {
      // The pending-jobs quota: wait for the queue to drain a little.
      sent -= 1;
      await new Promise((resolve) => setTimeout(resolve, 200));
      continue;
    }
    if (!response.ok) throw new Error(`POST /jobs: ${response.status} ${await response.text()}`);
    await response.arrayBuffer();
  }
}
await Promise.all(Array.from({ length: inFlight }, submitter));
console.log(`submitted ${total} jobs`);
