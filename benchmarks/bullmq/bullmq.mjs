// The workloads of jobhost's queue benchmarks, on BullMQ:
// - single: JOBS trivial jobs (the processor returns its payload), added
//   concurrently, timed until the last one completes, at worker concurrency
//   1, 8 and 64;
// - chain: JOBS chains of three sequential trivial jobs (each job's processor
//   adds the next), concurrency 64, timed until the last chain completes —
//   the counterpart of jobhost's 3-phase jobs;
// - latency: add → completed of one job at a time, LATENCY_SAMPLES jobs.
// Prints "single <concurrency> <jobs/s>", "chain 64 <chains/s>" (medians of
// SAMPLES) and "latency <p50 ms> <p99 ms>".
//
//   node bullmq.mjs <redis port> [jobs]
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const port = Number(process.argv[2] || 6390);
const JOBS = Number(process.argv[3] || 2000);
const SAMPLES = 3;
const LATENCY_SAMPLES = 100;
// BullMQ 6 in native ESM takes ready-made ioredis clients; workers need
// maxRetriesPerRequest: null.
const client = () => new IORedis({ host: "127.0.0.1", port, maxRetriesPerRequest: null });
const options = { removeOnComplete: true };

// Runs `add(queue)` for JOBS jobs against a worker running `processor`, and
// resolves with jobs/s once `isLast(job)` has been true JOBS times.
async function timed(name, concurrency, processor, isLast) {
  const queue = new Queue(name, { connection: client() });
  let completed = 0;
  let done;
  const finished = new Promise(resolve => { done = resolve; });
  const worker = new Worker(name, job => processor(queue, job), { connection: client(), concurrency, autorun: true });
  worker.on("completed", job => { if (isLast(job) && ++completed === JOBS) done(); });
  await worker.waitUntilReady();
  const started = process.hrtime.bigint();
  await Promise.all(Array.from({ length: JOBS }, (_, n) => queue.add("trivial", { n, step: 1 }, options)));
  await finished;
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  return JOBS / seconds;
}

const single = (queue, job) => job.data;
async function chain(queue, job) {
  if (job.data.step < 3) await queue.add("trivial", { ...job.data, step: job.data.step + 1 }, options);
  return job.data;
}

async function median(sample) {
  const rates = [];
  for (let round = 0; round < SAMPLES; round++) rates.push(await sample(round));
  rates.sort((a, b) => a - b);
  return rates[Math.floor(rates.length / 2)].toFixed(0);
}

for (const concurrency of [1, 8, 64]) {
  const rate = await median(round => timed(`single-${concurrency}-${round}`, concurrency, single, () => true));
  console.log(`single ${concurrency} ${rate}`);
}
console.log(`chain 64 ${await median(round => timed(`chain-${round}`, 64, chain, job => job.data.step === 3))}`);

{
  // Completion is seen on the worker's own "completed" event, in this
  // process, as jobhost's is seen on its in-process bus.
  const name = "latency";
  const queue = new Queue(name, { connection: client() });
  const worker = new Worker(name, single, { connection: client(), concurrency: 8, autorun: true });
  let finish;
  worker.on("completed", () => finish());
  await worker.waitUntilReady();
  const latencies = [];
  for (let n = 0; n < LATENCY_SAMPLES; n++) {
    const finished = new Promise(resolve => { finish = resolve; });
    const started = process.hrtime.bigint();
    await queue.add("trivial", { n }, options);
    await finished;
    latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  latencies.sort((a, b) => a - b);
  const rank = p => latencies[Math.max(1, Math.ceil(p / 100 * latencies.length)) - 1].toFixed(2);
  console.log(`latency ${rank(50)} ${rank(99)}`);
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
}
process.exit(0);
