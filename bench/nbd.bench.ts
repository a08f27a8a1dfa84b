/**
 * `vhdvault serve` against `qemu-nbd` serving the same data as a raw file,
 * measured with fio's nbd engine in the same run; and `backup --source nbd://`
 * against the same backup taken from the raw file.
 *
 *   npm run bench:nbd              # 1 GiB, table
 *   npm run bench:nbd -- --json    # rows as JSON
 *
 * Environment: BENCH_SIZE_MIB (default 1024), BENCH_SECONDS per fio job
 * (default 10), BENCH_ROUNDS (default 2; servers alternate, medians kept),
 * BENCH_LAYOUT (dir | vhd | objects, default dir), BENCH_DIR (where to work).
 *
 * fio jobs (one connection each): 4 KiB random reads at iodepth 1 and 16, and
 * 1 MiB sequential reads at iodepth 4, each after a 2 s ramp (our server
 * checks every block against its digest the first time it is read: the ramp
 * lets that happen, as a page cache warms for qemu-nbd). "first pass" is one
 * sequential pass over a freshly started server, digest checks included.
 * Goals (issue 9): ≥ 0.7 × qemu-nbd's IOPS at iodepth 16, ≥ 0.8 × its
 * sequential throughput, and backup over NBD ≥ 0.8 × backup from the file.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backup } from '../src/store/backup.js';
import { Repository, type LayoutName as Layout } from '../src/store/repository.js';
import { formatTable, median, MiB, mustRun, timeIt, writeRandomFile, waitForSocket, writeResults } from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

interface FioResult {
  iops: number;
  bytesPerSecond: number;
  p99us: number;
}

async function fio(uri: string, job: string[], seconds: number, timed = true): Promise<FioResult> {
  const timing = timed ? ['--time_based', `--runtime=${seconds}`, '--ramp_time=2'] : [];
  const r = await mustRun('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, ...job, ...timing, '--output-format=json']);
  // fio prints "fio: connected to NBD server" before its JSON.
  const read = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0].read;
  return { iops: read.iops, bytesPerSecond: read.bw_bytes, p99us: read.clat_ns.percentile['99.000000'] / 1000 };
}


async function startServer(kind: 'vhdvault' | 'qemu-nbd', work: string, repo: string, raw: string): Promise<{ uri: string; child: ChildProcess }> {
  const socket = join(work, `${kind}.sock`);
  await rm(socket, { force: true });
  const child =
    kind === 'vhdvault'
      ? spawn(process.execPath, [CLI, 'serve', repo, 'vm', '--socket', socket], { stdio: 'ignore' })
      : spawn('qemu-nbd', ['--read-only', '--persistent', '--format=raw', '--socket', socket, raw], { stdio: 'ignore' });
  await waitForSocket(socket);
  return { uri: `nbd+unix:///${kind === 'vhdvault' ? 'vm' : ''}?socket=${socket}`, child };
}

/**
 * Both servers' data read into the page cache before each server starts: the
 * machine may reclaim pages it sees unused (DAMON), and a server should not
 * win by its data having been read more recently than the other's.
 */
async function warm(raw: string, repo: string): Promise<void> {
  await mustRun('sh', ['-c', 'cat "$1" > /dev/null && find "$2" -type f -exec cat {} + > /dev/null', 'warm', raw, repo]);
}

async function stop(child: ChildProcess): Promise<void> {
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = Number(process.env.BENCH_SIZE_MIB ?? 1024) * MiB;
  const seconds = Number(process.env.BENCH_SECONDS ?? 10);
  const rounds = Number(process.env.BENCH_ROUNDS ?? 2);
  const layout = (process.env.BENCH_LAYOUT ?? 'dir') as Layout;
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vhdvault-bench-nbd-'));
  try {
    const raw = join(work, 'disk.raw');
    await writeRandomFile(raw, size);
    const repo = join(work, 'repo');
    await Repository.init(repo, { layout, compression: 'none' });
    await backup(await Repository.open(repo), 'vm', { source: raw });

    const jobs: Record<string, string[]> = {
      'randread 4k qd1': ['--rw=randread', '--bs=4k', '--iodepth=1'],
      'randread 4k qd16': ['--rw=randread', '--bs=4k', '--iodepth=16'],
      'read 1M qd4': ['--rw=read', '--bs=1M', '--iodepth=4'],
    };
    const results: Record<string, Record<string, FioResult[]>> = {};
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? (['vhdvault', 'qemu-nbd'] as const) : (['qemu-nbd', 'vhdvault'] as const);
      for (const kind of order) {
        // A fresh server per round: the first pass includes the digest checks.
        await warm(raw, repo);
        const server = await startServer(kind, work, repo, raw);
        try {
          const record = (job: string, r: FioResult) => ((results[job] ??= {})[kind] ??= []).push(r);
          record('first pass 1M', await fio(server.uri, ['--rw=read', '--bs=1M', '--iodepth=4'], seconds, false));
          for (const [name, job] of Object.entries(jobs)) record(name, await fio(server.uri, job, seconds));
        } finally {
          await stop(server.child);
        }
      }
    }

    // backup --source nbd:// (qemu-nbd serving the raw file) against backup --source <the raw file>, both through the CLI.
    const backups: Record<string, number[]> = { file: [], nbd: [] };
    const qemu = await startServer('qemu-nbd', work, repo, raw);
    try {
      for (let round = 0; round < rounds; round++) {
        for (const kind of round % 2 === 0 ? (['file', 'nbd'] as const) : (['nbd', 'file'] as const)) {
          const target = join(work, `backup-${kind}-${round}`);
          await Repository.init(target, { layout, compression: 'none' });
          const source = kind === 'file' ? raw : qemu.uri;
          backups[kind]!.push(await timeIt(() => mustRun(process.execPath, [CLI, 'backup', target, 'vm', '--source', source])));
          await rm(target, { recursive: true, force: true });
        }
      }
    } finally {
      await stop(qemu.child);
    }

    const rows = Object.entries(results).map(([job, byServer]) => {
      const ours = byServer.vhdvault!;
      const theirs = byServer['qemu-nbd']!;
      const iops = (rs: FioResult[]) => median(rs.map((r) => r.iops));
      const mbps = (rs: FioResult[]) => median(rs.map((r) => r.bytesPerSecond)) / 1e6;
      const p99 = (rs: FioResult[]) => median(rs.map((r) => r.p99us));
      return { job, vhdvaultIops: Math.round(iops(ours)), qemuNbdIops: Math.round(iops(theirs)), ratio: iops(ours) / iops(theirs), vhdvaultMBps: mbps(ours), qemuNbdMBps: mbps(theirs), vhdvaultP99us: p99(ours), qemuNbdP99us: p99(theirs) };
    });
    const fileSeconds = median(backups.file!);
    const nbdSeconds = median(backups.nbd!);
    const backupRow = { fileSeconds, nbdSeconds, ratio: fileSeconds / nbdSeconds };
    await writeResults('nbd', { sizeMiB: size / MiB, layout, seconds, rounds }, { sizeMiB: size / MiB, layout, seconds, rounds, rows, backup: backupRow }, { name: layout === 'dir' ? 'nbd' : `nbd-${layout}` });
    if (json) {
      console.log(JSON.stringify({ sizeMiB: size / MiB, layout, seconds, rounds, rows, backup: backupRow }, null, 2));
      return;
    }
    console.log(`vhdvault serve vs qemu-nbd, ${size / MiB} MiB (${layout} layout), fio nbd engine, ${seconds} s per job, median of ${rounds}`);
    console.log(
      formatTable(
        ['job', 'vhdvault IOPS', 'qemu-nbd IOPS', 'ratio', 'vhdvault MB/s', 'qemu-nbd MB/s', 'vhdvault p99', 'qemu-nbd p99'],
        rows.map((r) => [r.job, String(r.vhdvaultIops), String(r.qemuNbdIops), `${r.ratio.toFixed(2)}×`, r.vhdvaultMBps.toFixed(0), r.qemuNbdMBps.toFixed(0), `${r.vhdvaultP99us.toFixed(0)} µs`, `${r.qemuNbdP99us.toFixed(0)} µs`]),
      ),
    );
    console.log(`backup --source nbd:// (qemu-nbd) ${nbdSeconds.toFixed(2)} s vs --source <file> ${fileSeconds.toFixed(2)} s: ${backupRow.ratio.toFixed(2)}× (goal ≥ 0.8×)`);
    console.log('goals: randread 4k qd16 ≥ 0.7×, read 1M ≥ 0.8×');
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
