// Builds notify.wasm from notify.js against jobhost's contract (wit/).
//   node build.mjs OUT.wasm
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(new URL('.', import.meta.url));
const { component } = await componentize({
  sourcePath: here + 'notify.js',
  witPath: here + '../../../wit',
  worldName: 'plugin',
});
await writeFile(process.argv[2] ?? here + 'notify.wasm', component);
