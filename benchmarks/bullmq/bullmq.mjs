// The same workload as jobhost's queue-throughput scenario, on BullMQ:
// JOBS trivial jobs (the processor returns its payload), added concurrently,
// timed until the last one completes, at worker concurrency 1, 8 and 64.
// Prints one line per concurrency: "bullmq <concurrency> <jobs/s>" (median of SAMPLES).
//
//   node bullmq.mjs <redis port>
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const port = Number(process.argv[2] || 6390);
// BullMQ 6 in native ESM takes ready-made ioredis clients; workers need
// maxRetriesPerRequest: null.
const client = () => new IORedis({ host: "127.0.0.1", port, maxRetriesPerRequest: null });
const JOBS = 400;
const SAMPLES = 3;

async function sample(concurrency, round) {
  const name = `bench-${concurrency}-${round}`;
  const queue = new Queue(name, { connection: client() });
  let completed = 0;
  let done;
  const finished = new Promise(resolve => { done = resolve; });
  const worker = new Worker(name, async job => job.data, { connection: client(), concurrency, autorun: true });
  worker.on("completed", () => { if (++completed === JOBS) done(); });
  await worker.waitUntilReady();
  const started = process.hrtime.bigint();
  await Promise.all(Array.from({ length: JOBS }, (_, n) => queue.add("trivial", { n }, { removeOnComplete: true })));
  await finished;
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  return JOBS / seconds;
}

for (const concurrency of [1, 8, 64]) {
  const rates = [];
  for (let round = 0; round < SAMPLES; round++) rates.push(await sample(concurrency, round));
  rates.sort((a, b) => a - b);
  console.log(`bullmq ${concurrency} ${rates[Math.floor(rates.length / 2)].toFixed(0)}`);
}
process.exit(0);
