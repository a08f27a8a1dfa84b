/**
 * Backup throughput against `cp` of the same source, in the same run.
 *
 *   npm run bench:backup             # 1 GiB source, 3 rounds, table
 *   npm run bench:backup -- --json   # rows as JSON
 *
 * Environment: BENCH_SIZE_MIB (default 1024), BENCH_ROUNDS (default 3),
 * BENCH_DIR (where to work), BENCH_LAYOUT (dir | vhd, default dir),
 * BENCH_COMPRESSION (none | gzip | brotli, default none).
 *
 * Rows: cp of the source (the goal's baseline), cp + fsync (what a durable copy costs); a full backup with 1 and 2 workers; a delta after
 * 1% of the blocks changed, with 1 and 2 workers (the delta reads the whole
 * source and digests it, storing only the changed blocks). Throughput is source
 * bytes per second. Goal (issue): full backup ≥ 0.8 × cp.
 */
import { randomBytes, randomInt } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { backup } from '../src/store/backup.js';
import { Repository, type LayoutName as Layout } from '../src/store/repository.js';
import { type Compression, isCompression } from '../src/vhd/compression.js';
import { formatTable, fsyncFile, median, MiB, mustRun, syncAll, timeIt, writeRandomFile, writeResults } from './lib.js';

const GOAL = 0.8;
const BLOCK = 2 * MiB;

async function changePercent(path: string, size: number, percent: number): Promise<void> {
  const blocks = size / BLOCK;
  const fh = await open(path, 'r+');
  for (let i = 0; i < Math.max(1, Math.round((blocks * percent) / 100)); i++) {
    await fh.write(randomBytes(4096), 0, 4096, randomInt(blocks) * BLOCK);
  }
  await fh.close();
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = Number(process.env.BENCH_SIZE_MIB ?? 1024) * MiB;
  const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
  const layout = (process.env.BENCH_LAYOUT ?? 'dir') as Layout;
  const compression = (process.env.BENCH_COMPRESSION ?? 'none') as Compression;
  if (!isCompression(compression) || (layout !== 'dir' && layout !== 'vhd')) throw new Error('bad BENCH_LAYOUT or BENCH_COMPRESSION');
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vhdvault-bench-backup-'));
  try {
    const source = join(work, 'source.raw');
    await writeRandomFile(source, size);
    const runs: Record<string, number[]> = {};
    const record = (name: string, seconds: number) => (runs[name] ??= []).push(seconds);
    let n = 0;
    for (let round = 0; round < rounds; round++) {
      await rm(join(work, 'cp.raw'), { force: true });
      await syncAll();
      record('cp', await timeIt(() => mustRun('cp', [source, join(work, 'cp.raw')])));
      // Context, not the goal's baseline: a backup makes its data durable before committing; plain cp does not.
      await rm(join(work, 'cp.raw'), { force: true });
      await syncAll();
      record('cp + fsync', await timeIt(async () => {
        await mustRun('cp', [source, join(work, 'cp.raw')]);
        await fsyncFile(join(work, 'cp.raw'));
      }));
      for (const workers of [1, 2]) {
        const repo = await Repository.init(join(work, `repo-${n++}`), { layout, compression });
        await syncAll();
        record(`full backup, ${workers} worker${workers > 1 ? 's' : ''}`, await timeIt(() => backup(repo, 'disk', { source, concurrency: workers })));
        await changePercent(source, size, 1);
        await syncAll();
        record(`delta after 1% change, ${workers} worker${workers > 1 ? 's' : ''}`, await timeIt(() => backup(repo, 'disk', { source, concurrency: workers })));
        await rm(repo.root, { recursive: true, force: true });
      }
    }
    const cpRate = size / median(runs.cp!);
    const rows = Object.entries(runs).map(([operation, seconds]) => {
      const rate = size / median(seconds);
      const isFull = operation.startsWith('full');
      return { operation, bytes: size, medianSeconds: median(seconds), mibPerSecond: rate / MiB, ratioVsCp: rate / cpRate, goal: isFull ? GOAL : null, meetsGoal: isFull ? rate / cpRate >= GOAL : null };
    });
    const variant = [layout === 'dir' ? '' : layout, compression === 'none' ? '' : compression].filter((s) => s !== '');
    await writeResults('backup', { sizeMiB: size / MiB, rounds, layout, compression }, rows, { name: ['backup', ...variant].join('-') });
    if (json) return console.log(JSON.stringify(rows, null, 2));
    console.log(`source ${size / MiB} MiB of random data, layout ${layout}, compression ${compression}, ${rounds} rounds (median)`);
    console.log(
      formatTable(
        ['operation', 'seconds', 'MiB/s', 'ratio vs cp', 'goal'],
        rows.map((r) => [r.operation, r.medianSeconds.toFixed(3), r.mibPerSecond.toFixed(0), r.ratioVsCp.toFixed(2), r.goal === null ? '—' : `≥ ${r.goal} ${r.meetsGoal ? 'met' : 'NOT met'}`]),
      ),
    );
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
