/**
 * A delta from a qemu dirty bitmap: read whole dirty 2 MiB blocks (what backup
 * does, since digests and merges work on whole blocks) or only the dirty
 * extents (what a sub-block delta format would need)? Both, timed, over the
 * same export.
 *
 *   npm run bench:nbd-dirty             # 1 GiB qcow2, 32 / 256 / 2048 scattered 64 KiB writes, 3 rounds
 *   npm run bench:nbd-dirty -- --json
 *
 * Environment: BENCH_SIZE_MIB (default 1024), BENCH_WRITES (default "32,256,2048"),
 * BENCH_ROUNDS (default 3), BENCH_DIR (where to work), BENCH_DROP_CACHES=1 (root:
 * drop the whole machine's page cache before each run, which slows everything
 * else running; default: warm figures).
 *
 * The disk is fully allocated (a used VM disk), then one bitmap per write
 * count is added, filled by that many 64 KiB writes at random 64 KiB-aligned
 * offsets, and disabled; qemu-nbd -r exports them all (-B each). Each round,
 * per bitmap: (a) scan the bitmap, then read every dirty block through
 * NbdSource (4 blocks in flight, holes skipped via base:allocation, as backup
 * does); (b) scan the bitmap, then read exactly its dirty extents with
 * NbdClient (the window keeps 16 requests in flight).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import pLimit from 'p-limit';
import { NbdClient } from '../src/nbd/NbdClient.js';
import { bitmapContext, NbdSource } from '../src/nbd/NbdSource.js';
import { DIRTY } from '../src/nbd/constants.js';
import { testBit } from '../src/vhd/bitmap.js';
import { dropCaches, formatTable, median, MiB, mustRun, seededRandom, waitForSocket, writeResults } from './lib.js';

const BLOCK = 2 * MiB;
const WRITE = 64 * 1024;

interface Row {
  writes: number;
  way: 'whole blocks' | 'dirty extents';
  units: number;
  bytesRead: number;
  seconds: number;
}


async function wholeBlocks(uri: string, bitmap: string): Promise<{ units: number; bytesRead: number }> {
  const source = await NbdSource.open(uri, { bitmap });
  try {
    const dirty = await source.dirtyBlocks(bitmap);
    const blocks = [...Array(source.blockCount).keys()].filter((b) => testBit(dirty, b));
    const slots = pLimit(4); // backup's SOURCE_READS_IN_FLIGHT
    await Promise.all(blocks.map((b) => slots(() => source.readBlock(b))));
    return { units: blocks.length, bytesRead: source.bytesRead };
  } finally {
    await source.close();
  }
}

async function dirtyExtents(uri: string, bitmap: string): Promise<{ units: number; bytesRead: number }> {
  const context = bitmapContext(bitmap);
  const client = await NbdClient.connect(uri, { contexts: [context] });
  try {
    const extents: Array<[number, number]> = [];
    for (let at = 0; at < client.size; ) {
      for (const e of await client.blockStatus(at, Math.min(client.size - at, 1024 * MiB), context)) {
        if (e.flags & DIRTY) extents.push([at, e.length]);
        at += e.length;
      }
    }
    const counts = await Promise.all(extents.map(([offset, length]) => client.readInto(Buffer.allocUnsafe(length), 0, offset, length)));
    return { units: extents.length, bytesRead: counts.reduce((a, b) => a + b, 0) };
  } finally {
    await client.disconnect();
  }
}


async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = Number(process.env.BENCH_SIZE_MIB ?? 1024) * MiB;
  const counts = (process.env.BENCH_WRITES ?? '32,256,2048').split(',').map(Number);
  const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vhdvault-bench-nbd-'));
  const image = join(work, 'disk.qcow2');
  const socket = join(work, 'nbd.sock');
  let server: ReturnType<typeof spawn> | null = null;
  try {
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x11 0 ${size}`, image]);
    const next = seededRandom(42); // the same offsets every run
    for (const n of counts) {
      await mustRun('qemu-img', ['bitmap', '--add', image, `w${n}`]);
      const writes = Array.from({ length: n }, () => `write -P 0xab ${Math.floor(next() * (size / WRITE)) * WRITE} ${WRITE}`);
      // In batches: one qemu-io per few hundred writes keeps the argument list short.
      for (let i = 0; i < writes.length; i += 256) await mustRun('qemu-io', ['-f', 'qcow2', ...writes.slice(i, i + 256).flatMap((c) => ['-c', c]), image]);
      await mustRun('qemu-img', ['bitmap', '--disable', image, `w${n}`]);
    }
    server = spawn('qemu-nbd', ['-r', '-t', '-f', 'qcow2', '-k', socket, ...counts.flatMap((n) => ['-B', `w${n}`]), image], { stdio: 'ignore' });
    await waitForSocket(socket);
    const uri = `nbd+unix:///?socket=${socket}`;

    const rows: Row[] = [];
    const dropping = process.env.BENCH_DROP_CACHES === '1';
    let cold = dropping;
    for (const n of counts) {
      for (const [way, fn] of [['whole blocks', wholeBlocks], ['dirty extents', dirtyExtents]] as const) {
        const times: number[] = [];
        let last = { units: 0, bytesRead: 0 };
        for (let r = 0; r < rounds; r++) {
          if (dropping) cold = (await dropCaches()) && cold;
          const start = process.hrtime.bigint();
          last = await fn(uri, `w${n}`);
          times.push(Number(process.hrtime.bigint() - start) / 1e9);
        }
        rows.push({ writes: n, way, units: last.units, bytesRead: last.bytesRead, seconds: median(times) });
      }
    }
    const pageCache = cold ? 'dropped before each run' : 'warm';
    await writeResults('nbd-dirty', { sizeMiB: size / MiB, rounds, pageCache }, { size, rounds, pageCache, rows }, { name: cold ? 'nbd-dirty-cold' : 'nbd-dirty' });
    if (json) return console.log(JSON.stringify({ size, rounds, pageCache: cold ? 'dropped' : 'warm', rows }, null, 2));
    console.log(`${size / MiB} MiB qcow2, fully allocated; 64 KiB writes at random 64 KiB-aligned offsets; median of ${rounds}; page cache ${cold ? 'dropped before each run' : 'warm'}`);
    console.log(
      formatTable(
        ['writes', 'read', 'blocks / extents', 'MiB read', 's', 'MiB/s', '× bytes', '× time'],
        rows.map((r) => {
          // Relative to reading only the dirty extents of the same bitmap.
          const base = rows.find((x) => x.writes === r.writes && x.way === 'dirty extents')!;
          const mibRead = r.bytesRead / MiB;
          return [String(r.writes), r.way, String(r.units), mibRead.toFixed(1), r.seconds.toFixed(3), (mibRead / r.seconds).toFixed(0), (r.bytesRead / base.bytesRead).toFixed(1), (r.seconds / base.seconds).toFixed(1)];
        }),
      ),
    );
  } finally {
    if (server && server.exitCode === null) {
      const gone = new Promise((r) => server!.once('exit', r));
      server.kill('SIGTERM');
      await gone;
    }
    await rm(work, { recursive: true, force: true });
  }
}

await main();
