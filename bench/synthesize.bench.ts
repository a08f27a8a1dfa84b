/**
 * Synthesizing one full VHD from a 10-deep chain, against `cp` of a file of the
 * output's size, in the same run.
 *
 *   npm run bench:synthesize             # 1 GiB disk, 5 rounds, table
 *   npm run bench:synthesize -- --json   # rows as JSON
 *
 * Environment: BENCH_SIZE_MIB (default 1024), BENCH_ROUNDS (default 5), BENCH_DIR,
 * BENCH_COLD=1 to drop the page cache before every timed run (root only), so both
 * sides read from the disk rather than from memory.
 *
 * The chain: a full base (every block written) and nine deltas alternating
 * VHD files and directories, each rewriting a different 10% of the blocks,
 * one in three of them with a partial sector bitmap (half the sectors), so
 * reads really walk the chain. The output is written to a file, as cp's is.
 * Goal (issue): synthesis throughput ≥ 0.8 × cp throughput.
 */
import { randomFillSync } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { bitmapByteSize, fullBitmap, setSector } from '../src/vhd/bitmap.js';
import { VhdChain } from '../src/vhd/VhdChain.js';
import { VhdDirectoryWriter } from '../src/vhd/VhdDirectory.js';
import { DynamicVhdWriter, type ParentLink } from '../src/vhd/VhdWriter.js';
import { openDisk } from '../src/vhd/openDisk.js';
import { synthesizeVhd } from '../src/vhd/synthesize.js';
import { dropCaches, envInt, formatTable, median, MiB, mustRun, syncAll, timeIt, writeRandomFile, writeResults } from './lib.js';

const GOAL = 0.8;
const BLOCK = 2 * MiB;
const DEPTH = 10;

async function parentLink(parentPath: string): Promise<ParentLink> {
  const parent = await openDisk(parentPath);
  await parent.close();
  return { uuid: parent.footer.uuid, timestamp: parent.footer.timestamp, relativePath: parentPath.split('/').pop()!, absolutePath: resolve(parentPath) };
}

/** Build base + 9 deltas; returns the top's path. */
async function buildChain(dir: string, size: number): Promise<string> {
  const blocks = size / BLOCK;
  const data = Buffer.allocUnsafe(BLOCK);
  let parent = join(dir, 'm0.vhd');
  const base = await DynamicVhdWriter.create(parent, { size });
  for (let b = 0; b < blocks; b++) await base.writeBlock(b, randomFillSync(data));
  await base.finish();
  const half = Buffer.alloc(bitmapByteSize(BLOCK));
  for (let s = 0; s < BLOCK / 512; s += 2) setSector(half, s);
  for (let level = 1; level < DEPTH; level++) {
    const asDir = level % 2 === 1;
    const path = join(dir, `m${level}.${asDir ? 'vhd-dir' : 'vhd'}`);
    const options = { size, parent: await parentLink(parent) };
    const writer = asDir ? await VhdDirectoryWriter.create(path, options) : await DynamicVhdWriter.create(path, options);
    // A different tenth of the blocks at each level.
    for (let b = level % 10; b < blocks; b += 10) {
      await writer.writeBlock(b, randomFillSync(data), b % 3 === 0 ? half : fullBitmap(BLOCK));
    }
    await writer.finish();
    parent = path;
  }
  return parent;
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = envInt('BENCH_SIZE_MIB', 1024) * MiB;
  const rounds = envInt('BENCH_ROUNDS', 5);
  const cold = process.env.BENCH_COLD === '1';
  const dir = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vhdvault-bench-synth-'));
  try {
    const top = await buildChain(dir, size);
    const out = join(dir, 'synth.vhd');
    const chain = await VhdChain.open(top);
    const { length } = synthesizeVhd(chain);
    await chain.close();
    const same = join(dir, 'same-size.bin');
    const cpOut = join(dir, 'cp.bin');
    await writeRandomFile(same, length);

    const runs = { synth: [] as number[], cp: [] as number[] };
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? (['synth', 'cp'] as const) : (['cp', 'synth'] as const);
      for (const op of order) {
        await rm(out, { force: true });
        await rm(cpOut, { force: true });
        await syncAll();
        if (cold && !(await dropCaches())) throw new Error('BENCH_COLD=1 needs root (writes /proc/sys/vm/drop_caches)');
        if (op === 'cp') {
          runs.cp.push(await timeIt(() => mustRun('cp', [same, cpOut])));
        } else {
          runs.synth.push(
            await timeIt(async () => {
              const c = await VhdChain.open(top);
              try {
                await pipeline(synthesizeVhd(c).stream, createWriteStream(out));
              } finally {
                await c.close();
              }
            }),
          );
          if ((await stat(out)).size !== length) throw new Error('synthesized output length differs from the announced length');
        }
      }
    }
    const cpRate = length / median(runs.cp);
    const rows = (['cp', 'synth'] as const).map((op) => {
      const seconds = median(runs[op]);
      const rate = length / seconds;
      return {
        operation: op === 'cp' ? 'cp (same size)' : `synthesize ${DEPTH}-deep chain → VHD`,
        bytes: length,
        medianSeconds: seconds,
        mibPerSecond: rate / MiB,
        ratioVsCp: rate / cpRate,
        goal: op === 'cp' ? null : GOAL,
        meetsGoal: op === 'cp' ? null : rate / cpRate >= GOAL,
      };
    });
    await writeResults('synthesize', { sizeMiB: size / MiB, depth: DEPTH, rounds, pageCache: cold ? 'dropped before each run' : 'warm' }, rows, { name: cold ? 'synthesize-cold' : 'synthesize' });
    if (json) {
      console.log(JSON.stringify(rows, null, 2));
      return;
    }
    console.log(
      `disk ${size / MiB} MiB, chain of ${DEPTH} (5 files, 5 directories), output ${length} bytes, ` +
        `${rounds} rounds (median), ${cold ? 'cold' : 'warm'} page cache`,
    );
    console.log(
      formatTable(
        ['operation', 'seconds', 'MiB/s', 'ratio vs cp', 'goal'],
        rows.map((r) => [r.operation, r.medianSeconds.toFixed(3), r.mibPerSecond.toFixed(0), r.ratioVsCp.toFixed(2), r.goal === null ? '—' : `≥ ${r.goal} ${r.meetsGoal ? 'met' : 'NOT met'}`]),
      ),
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
