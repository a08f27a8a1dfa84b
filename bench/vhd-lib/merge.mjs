/**
 * The baseline half of bench:merge: Xen Orchestra's vhd-lib merging a chain
 * of two VHD directories through its local handler, run in its own process
 * so that neither program's heap or caches bill the other.
 *
 *   node bench/vhd-lib/merge.mjs <folder> <parent dir> <child dir>
 *
 * Both directories are names inside <folder>. Prints one JSON line: the
 * merge's milliseconds (the child's blocks renamed over the parent's, the
 * merged result renamed to the child's name, the child removed: what XO's
 * merge of a removed backup does), and the versions measured.
 * Needs `npm --prefix bench/vhd-lib install` (see package.json there).
 */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { mergeVhdChain } = require('vhd-lib/merge.js');
const { getSyncedHandler } = require('@xen-orchestra/fs');

const [folder, parent, child] = process.argv.slice(2);
if (!folder || !parent || !child) throw new Error('usage: merge.mjs <folder> <parent dir> <child dir>');
const { value: handler, dispose } = await getSyncedHandler({ url: `file://${folder}` });
try {
  const start = performance.now();
  // removeUnused: the merged child is deleted, as XO's backup cleaning asks; block concurrency: vhd-lib's default.
  await mergeVhdChain(handler, [parent, child], { removeUnused: true });
  const ms = performance.now() - start;
  const version = (name) => require(`${name}/package.json`).version;
  console.log(JSON.stringify({ ms, vhdLib: version('vhd-lib') }));
} finally {
  await dispose();
}
