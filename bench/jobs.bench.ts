/**
 * A job over many disks: how throughput changes with the job's
 * `concurrency`, and which stage bounds each run (from the run report).
 *
 *   npm run bench:jobs              # 8 disks of 256 MiB, concurrency 1, 2, 4; table
 *   npm run bench:jobs -- --json    # rows as JSON
 *
 * Environment: BENCH_DISKS (default 8), BENCH_SIZE_MIB (default 256),
 * BENCH_ROUNDS (default 2), BENCH_DIR (where to work).
 *
 * Per setting and round: a fresh repository, `job run` (every disk full),
 * 1% of each disk's blocks changed (a 4 KiB write in each, as bench:backup
 * does), `job run` again (every disk a delta: read whole and digested, the
 * changed blocks stored). Throughput is source bytes per second over the
 * run's wall time. Baseline in the same script: `cp` of all the disks into
 * one folder (and the same + fsync). The disks are in the page cache, as
 * they would be on a hypervisor with spare memory: the runs are CPU-bound.
 */
import { randomBytes, randomInt } from 'node:crypto';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatTable, median, MiB, mustRun, syncAll, timeIt, writeRandomFile, writeResults } from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const BLOCK = 2 * MiB;
const SETTINGS = [1, 2, 4];

interface Report {
  ok: boolean;
  durationMs: number;
  boundingStage: string | null;
  stages: Record<string, { busyMs: number }>;
  disks: Array<{ kind?: string; bytesWritten?: number; boundingStage?: string }>;
}

async function changeBlocks(path: string, size: number, percent: number): Promise<void> {
  const blocks = size / BLOCK;
  const fh = await open(path, 'r+');
  for (let i = 0; i < Math.max(1, Math.round((blocks * percent) / 100)); i++) await fh.write(randomBytes(4096), 0, 4096, randomInt(blocks) * BLOCK);
  await fh.close();
}

async function jobRun(file: string): Promise<{ seconds: number; report: Report }> {
  let out = '';
  const seconds = await timeIt(async () => (out = (await mustRun(process.execPath, [CLI, 'job', 'run', file, '--json'])).stdout));
  const report = JSON.parse(out) as Report;
  if (!report.ok) throw new Error(`job run failed: ${out}`);
  return { seconds, report };
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const count = Number(process.env.BENCH_DISKS ?? 8);
  const size = Number(process.env.BENCH_SIZE_MIB ?? 256) * MiB;
  const rounds = Number(process.env.BENCH_ROUNDS ?? 2);
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vv-jobs-'));
  const log = (s: string) => !json && console.error(s);
  try {
    const disks = Array.from({ length: count }, (_, i) => join(work, `disk${i}.raw`));
    log(`making ${count} disks of ${size / MiB} MiB`);
    for (const d of disks) await writeRandomFile(d, size);
    const total = count * size;
    const rate = (seconds: number) => total / MiB / seconds;

    const cp: number[] = [];
    const cpSync: number[] = [];
    const full = new Map<number, Array<{ seconds: number; report: Report }>>();
    const delta = new Map<number, Array<{ seconds: number; report: Report }>>();
    for (let round = 0; round < rounds; round++) {
      const copies = join(work, 'copies');
      await mkdir(copies);
      cp.push(await timeIt(() => mustRun('cp', [...disks, copies])));
      await rm(copies, { recursive: true });
      await mkdir(copies);
      cpSync.push(
        await timeIt(async () => {
          await mustRun('cp', [...disks, copies]);
          await mustRun('sync', ['-f', copies]);
        }),
      );
      await rm(copies, { recursive: true });
      for (const c of SETTINGS) {
        log(`round ${round + 1}: concurrency ${c}`);
        const repo = join(work, `repo-${c}`);
        await rm(repo, { recursive: true, force: true });
        await mustRun(process.execPath, [CLI, 'init', repo]);
        const file = join(work, `job-${c}.yaml`);
        const diskLines = disks.map((d, i) => `  - name: d${i}\n    source: ${d}\n`).join('');
        await writeFile(file, `name: bench${c}\nschedule: "0 3 * * *"\nrepository: ${repo}\nconcurrency: ${c}\ndisks:\n${diskLines}`);
        await syncAll();
        (full.get(c) ?? full.set(c, []).get(c)!).push(await jobRun(file));
        for (const d of disks) await changeBlocks(d, size, 1);
        await syncAll();
        (delta.get(c) ?? delta.set(c, []).get(c)!).push(await jobRun(file));
        await rm(repo, { recursive: true, force: true });
      }
    }

    const rows = SETTINGS.map((c) => {
      const f = full.get(c)!;
      const d = delta.get(c)!;
      const fs = median(f.map((r) => r.seconds));
      const ds = median(d.map((r) => r.seconds));
      return {
        concurrency: c,
        fullSeconds: fs,
        fullMiBps: rate(fs),
        fullBounding: f.map((r) => r.report.boundingStage),
        deltaSeconds: ds,
        deltaMiBps: rate(ds),
        deltaBounding: d.map((r) => r.report.boundingStage),
        deltaBytesWritten: d[0]!.report.disks.reduce((n, x) => n + (x.bytesWritten ?? 0), 0),
      };
    });
    const result = { disks: count, sizeMiB: size / MiB, rounds, cpSeconds: median(cp), cpMiBps: rate(median(cp)), cpSyncSeconds: median(cpSync), cpSyncMiBps: rate(median(cpSync)), rows };
    await writeResults('jobs', { disks: count, sizeMiB: size / MiB, rounds, layout: 'dir', compression: 'none' }, result);
    if (json) return void console.log(JSON.stringify(result, null, 2));
    console.log(`${count} disks × ${size / MiB} MiB (${(total / MiB / 1024).toFixed(1)} GiB), median of ${rounds} rounds; cp of all disks ${median(cp).toFixed(2)} s (${rate(median(cp)).toFixed(0)} MiB/s), cp + sync ${median(cpSync).toFixed(2)} s (${rate(median(cpSync)).toFixed(0)} MiB/s)`);
    const table = rows.map((r) => [
      String(r.concurrency),
      `${r.fullSeconds.toFixed(2)} s`,
      `${r.fullMiBps.toFixed(0)} MiB/s`,
      `${(r.fullMiBps / result.cpSyncMiBps).toFixed(2)}×`,
      r.fullBounding.join(', '),
      `${r.deltaSeconds.toFixed(2)} s`,
      `${r.deltaMiBps.toFixed(0)} MiB/s`,
      r.deltaBounding.join(', '),
    ]);
    console.log(formatTable(['concurrency', 'full run', 'full rate', 'vs cp+sync', 'bounded by (full)', 'delta run (1%)', 'delta rate', 'bounded by (delta)'], table));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
