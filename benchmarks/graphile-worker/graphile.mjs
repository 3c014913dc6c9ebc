// The workload of `jobhost bench --only postgres`, on Graphile Worker: JOBS
// trivial jobs (the task returns its payload) added concurrently, timed
// until the last one has succeeded, with 64 jobs at once; on the same
// PostgreSQL. Twice: with Graphile Worker's defaults (but for the
// concurrency), and tuned as its performance docs advise (a local queue,
// batched completion, a pool as large as the concurrency). Prints
// "<preset> <jobs/s>" (the median of SAMPLES).
//
//   node graphile.mjs <postgres url> [jobs]
import { Logger, makeWorkerUtils, run } from "graphile-worker";

const connectionString = process.argv[2];
const JOBS = Number(process.argv[3] || 2000);
const SAMPLES = 3;
const CONCURRENCY = 64;

// Graphile Worker logs every job at INFO; jobhost logs none of them.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

const presets = {
  defaults: { concurrentJobs: CONCURRENCY },
  tuned: {
    concurrentJobs: CONCURRENCY,
    maxPoolSize: CONCURRENCY + 1,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};

async function sample(options) {
  let succeeded = 0;
  let done;
  const finished = new Promise(resolve => { done = resolve; });
  const runner = await run({
    preset: { worker: { connectionString, ...options } },
    taskList: { trivial: async payload => payload },
    noHandleSignals: true,
    logger,
  });
  runner.events.on("job:success", () => { if (++succeeded === JOBS) done(); });
  const utils = await makeWorkerUtils({ connectionString, logger });
  const started = process.hrtime.bigint();
  await Promise.all(Array.from({ length: JOBS }, (_, n) => utils.addJob("trivial", { n })));
  await finished;
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await runner.stop();
  await utils.release();
  return JOBS / seconds;
}

for (const [name, options] of Object.entries(presets)) {
  const rates = [];
  for (let round = 0; round < SAMPLES; round++) rates.push(await sample(options));
  rates.sort((a, b) => a - b);
  console.log(`${name} ${rates[Math.floor(rates.length / 2)].toFixed(0)}`);
}
