/**
 * The objects layout on an S3-compatible store (docs/design/04-repository.md §4.15), against an
 * s3rver this script starts on 127.0.0.1 (test/s3server.mjs) and stops at the end.
 *
 *   npm run bench:s3                 # 1 GiB source, 5 merge rounds, tables
 *   npm run bench:s3 -- --json       # only the JSON line (the tables are followed by it otherwise)
 *
 * Environment: BENCH_SIZE_MIB (disk size, default 1024, at least 512),
 * BENCH_ROUNDS (merge rounds, default 5), BENCH_DIR (where to work: the source,
 * the folder repository, the restores and s3rver's objects, so that both
 * repositories sit on the same filesystem; default /dev/shm when it has room,
 * as test/s3server.mjs does, else the system's temporary folder).
 *
 * 1. Merge of 256 changed 2 MiB blocks. A full backup of the source into an
 *    s3:// repository (the one part 2 times), then per round: 256 blocks of the
 *    source changed, a delta taken (untimed), and the timed part of
 *    `prune --keep-last 1`, in-process: mergeForward(full, delta), then
 *    collectGarbage (which must free exactly the 256 replaced objects). The
 *    next round merges into the result, so every round has a fresh chain.
 *    Baseline, same server, same rounds: Xen Orchestra's merge of exploded VHDs
 *    (vhd-lib VhdDirectory.mergeBlock), which "renames" each child block file
 *    into the parent: on S3 (@xen-orchestra/fs s3.js _rename) a CopyObject and
 *    then a DeleteObject; then the parent's bat and footer are rewritten. The
 *    child's 256 blocks (each 512-byte bitmap + 2 MiB, as XO stores them
 *    uncompressed; the parent holds the same blocks, which they overwrite) are
 *    copied afresh from a pristine set before each timed run. Run at XO's
 *    default of 2 blocks in flight (mergeBlockConcurrency: packages/vhd-lib/merge.js
 *    `mergeVhdChain`, @xen-orchestra/backup-archive MergeRemoteDisk.mjs,
 *    xo-server config.toml) and at 16 (our S3 client's request limit).
 *    Left out of the baseline, in its favour: XO's two HEADs per block
 *    (getSizeOnDisk before and after), its merge-state writes, and the clean-up
 *    that renames the parent to the child and deletes the child.
 * 2. Backup and restore throughput: a full backup of the source into a folder
 *    repository (dir layout) and into the s3:// repository, then a restore of
 *    each to a raw file (checked equal to the source), in-process through the
 *    API (no CLI start-up). s3rver runs on the same machine and takes CPU.
 */
import { spawn } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, mkdtemp, open, rm, statfs } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import pLimit from 'p-limit';
import type { S3Client } from '@aws-sdk/client-s3';
import { backup } from '../src/store/backup.js';
import { collectGarbage, objectsNamedBy } from '../src/store/layouts/blockObjects.js';
import { mergeForward } from '../src/store/merge.js';
import { type BackupMetadata, Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { S3Storage } from '../src/storage/S3Storage.js';
import { newBucket, s3Env } from '../test/helpers/s3Server.js';
import { describeFilesystem, formatTable, median, MiB, sameContent, syncAll, writeRandomFile, writeResults } from './lib.js';

const BLOCK = 2 * MiB;
const CHANGED = 256;
const DISK = 'vm';
/** Xen Orchestra's default mergeBlockConcurrency (see the header). */
const XO_DEFAULT_CONCURRENCY = 2;
/** S3Storage's requests in flight (VHDVAULT_S3_REQUESTS, default 16). */
const OUR_REQUESTS = Number(process.env.VHDVAULT_S3_REQUESTS ?? 16);
/** A VHD block's sector bitmap (2 MiB blocks of 512-byte sectors), stored in front of its data in XO's block files. */
const BITMAP = Buffer.alloc(512, 0xff);

const note = (line: string) => process.stderr.write(`s3 bench: ${line}\n`);
const round1 = (n: number) => Math.round(n * 10) / 10;

interface Server {
  endpoint: string;
  stop(): Promise<void>;
}

/** test/s3server.mjs (run from the source tree: it is not compiled) keeping its objects in `directory`. */
async function startServer(directory: string): Promise<Server> {
  const script = fileURLToPath(new URL('../../test/s3server.mjs', import.meta.url));
  const child = spawn(process.execPath, ['--openssl-legacy-provider', script, '0', directory], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = once(child, 'exit');
  const [endpoint] = (await Promise.race([once(createInterface({ input: child.stdout }), 'line'), exited.then(() => [null])])) as [string | null];
  if (!endpoint) throw new Error('test/s3server.mjs exited before it listened');
  return {
    endpoint,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Write 4 KiB of new random data into each of `blocks` (so each gets a new digest). */
async function changeBlocks(path: string, blocks: readonly number[]): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    for (const b of blocks) await fh.write(randomBytes(4096), 0, 4096, b * BLOCK + randomInt(BLOCK / 4096) * 4096);
  } finally {
    await fh.close();
  }
}

/** `count` distinct blocks spread evenly over the disk, shifted by `shift`. */
function spreadBlocks(count: number, blockCount: number, shift: number): number[] {
  const step = blockCount / count;
  return Array.from({ length: count }, (_, i) => (Math.floor(i * step) + shift) % blockCount);
}

/** /dev/shm when it holds what a run stores at its peak (about 5 × the disk), else the temporary folder. */
async function defaultBase(size: number): Promise<string> {
  const shm = await statfs('/dev/shm').catch(() => null);
  return shm && shm.bavail * shm.bsize > 6 * size ? '/dev/shm' : tmpdir();
}

/** Milliseconds taken by `fn`. */
async function msOf(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

/**
 * An exploded VHD of Xen Orchestra's, in a bucket: `<dir>/header`, `bat`,
 * `footer`, and `blocks/<n / 1000>/<n % 1000>` (bitmap + data) per block.
 */
class XoExploded {
  constructor(
    private readonly client: S3Client,
    private readonly sdk: typeof import('@aws-sdk/client-s3'),
    private readonly bucket: string,
    readonly dir: string,
  ) {}

  blockKey(n: number): string {
    return `${this.dir}/blocks/${Math.floor(n / 1000)}/${n % 1000}`;
  }

  async put(key: string, body: Buffer): Promise<void> {
    await this.client.send(new this.sdk.PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body }));
  }

  /** Metadata objects (their content does not matter to the timing, only their size). */
  async putMetadata(blockCount: number): Promise<void> {
    await this.put(`${this.dir}/header`, Buffer.alloc(1024));
    await this.put(`${this.dir}/bat`, Buffer.alloc(Math.ceil(blockCount / 8)));
    await this.put(`${this.dir}/footer`, Buffer.alloc(512));
  }

  /** Upload the given blocks of the source file, 16 at a time. */
  async putBlocks(source: string, blocks: readonly number[]): Promise<void> {
    const fh = await open(source, 'r');
    const limit = pLimit(16);
    try {
      await Promise.all(
        blocks.map((n) =>
          limit(async () => {
            const body = Buffer.alloc(BITMAP.length + BLOCK);
            BITMAP.copy(body);
            await fh.read(body, BITMAP.length, BLOCK, n * BLOCK);
            await this.put(this.blockKey(n), body);
          }),
        ),
      );
    } finally {
      await fh.close();
    }
  }

  /** Server-side copies of `from`'s blocks, 16 at a time (untimed refills: cheaper than uploading again). */
  async copyBlocksFrom(from: XoExploded, blocks: readonly number[]): Promise<void> {
    const limit = pLimit(16);
    await Promise.all(blocks.map((n) => limit(() => this.client.send(new this.sdk.CopyObjectCommand({ Bucket: this.bucket, Key: this.blockKey(n), CopySource: `${this.bucket}/${from.blockKey(n)}` })))));
  }

  async count(prefix: string): Promise<number> {
    let n = 0;
    let ContinuationToken: string | undefined;
    do {
      const page = await this.client.send(new this.sdk.ListObjectsV2Command({ Bucket: this.bucket, Prefix: `${this.dir}/${prefix}`, ContinuationToken }));
      n += page.KeyCount ?? 0;
      ContinuationToken = page.NextContinuationToken;
    } while (ContinuationToken);
    return n;
  }

  /**
   * What XO's merge does to `child`'s blocks on S3: per block (`concurrency` at
   * a time) a CopyObject to the parent's key, then a DeleteObject of the
   * child's; then the parent's bat and its footer are written.
   */
  async mergeInto(parent: XoExploded, blocks: readonly number[], concurrency: number, blockCount: number): Promise<void> {
    const limit = pLimit(concurrency);
    await Promise.all(
      blocks.map((n) =>
        limit(async () => {
          await this.client.send(new this.sdk.CopyObjectCommand({ Bucket: this.bucket, Key: parent.blockKey(n), CopySource: `${this.bucket}/${this.blockKey(n)}` }));
          await this.client.send(new this.sdk.DeleteObjectCommand({ Bucket: this.bucket, Key: this.blockKey(n) }));
        }),
      ),
    );
    await parent.put(`${parent.dir}/bat`, Buffer.alloc(Math.ceil(blockCount / 8), 0xff));
    await parent.put(`${parent.dir}/footer`, Buffer.alloc(512));
  }
}

interface IoRow {
  operation: 'full backup' | 'restore (raw)';
  repository: 'folder' | 's3';
  seconds: number;
  mibPerSecond: number;
}

/** Full backup of `source` into `repo`, then its restore to a raw file checked against the source. */
async function backupAndRestore(repo: Repository, kind: IoRow['repository'], source: string, out: string, size: number): Promise<{ rows: IoRow[]; full: BackupMetadata }> {
  await syncAll();
  const backupMs = await msOf(() => backup(repo, DISK, { source }));
  await syncAll();
  const restoreMs = await msOf(() => restore(repo, DISK, out, { format: 'raw' }));
  if (!(await sameContent(source, out))) throw new Error(`the restore from the ${kind} repository differs from the source`);
  await rm(out, { force: true });
  const row = (operation: IoRow['operation'], ms: number): IoRow => ({ operation, repository: kind, seconds: ms / 1000, mibPerSecond: size / MiB / (ms / 1000) });
  const full = await repo.latest(DISK);
  if (!full) throw new Error('no backup after the full backup');
  return { rows: [row('full backup', backupMs), row('restore (raw)', restoreMs)], full };
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = Number(process.env.BENCH_SIZE_MIB ?? 1024) * MiB;
  const rounds = Number(process.env.BENCH_ROUNDS ?? 5);
  const blockCount = size / BLOCK;
  if (!Number.isInteger(blockCount) || blockCount < CHANGED) throw new Error(`BENCH_SIZE_MIB must be a multiple of 2 and at least ${(CHANGED * BLOCK) / MiB}`);
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('BENCH_ROUNDS must be a whole number ≥ 1');

  const base = process.env.BENCH_DIR ?? (await defaultBase(size));
  const work = await mkdtemp(join(base, 'vhdvault-bench-s3-'));
  // Maps read from the store are cached locally (§4.15): here, not in the user's cache.
  process.env.VHDVAULT_CACHE_DIR = join(work, 'cache');
  const s3Dir = join(work, 's3rver');
  await mkdir(s3Dir);
  let server: Server | null = null;
  let s3Repo: Repository | null = null;
  let client: S3Client | null = null;
  try {
    server = await startServer(s3Dir);
    Object.assign(process.env, s3Env(server.endpoint));
    const bucket = await newBucket(server.endpoint, 'vhdvault-bench');
    const sdk = await import('@aws-sdk/client-s3');
    client = new sdk.S3Client({
      endpoint: server.endpoint,
      region: 'us-east-1',
      forcePathStyle: true,
      credentials: { accessKeyId: process.env.AWS_ACCESS_KEY_ID!, secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY! },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });

    const source = join(work, 'source.raw');
    note(`writing ${size / MiB} MiB of random data`);
    await writeRandomFile(source, size);

    // 2. Backup and restore, folder then S3.
    note('folder repository: full backup and restore');
    const folderRepo = await Repository.init(join(work, 'folder-repo'), { compression: 'none' });
    const folder = await backupAndRestore(folderRepo, 'folder', source, join(work, 'restored.raw'), size);
    await rm(folderRepo.root, { recursive: true, force: true });
    note('s3 repository: full backup and restore');
    s3Repo = await Repository.init({ root: `s3://${bucket}/vault`, endpoint: server.endpoint }, { compression: 'none' });
    const s3 = await backupAndRestore(s3Repo, 's3', source, join(work, 'restored.raw'), size);
    const ioRows = [...folder.rows, ...s3.rows];

    // 1. Merges: ours, and XO's at its default concurrency and at 16, interleaved round by round.
    const xoConcurrencies = [...new Set([XO_DEFAULT_CONCURRENCY, OUR_REQUESTS])];
    const xoBlocks = spreadBlocks(CHANGED, blockCount, 0);
    const xoPristine = new XoExploded(client, sdk, bucket, 'xo/pristine.vhd');
    const xoParent = new XoExploded(client, sdk, bucket, 'xo/parent.vhd');
    const xoChild = new XoExploded(client, sdk, bucket, 'xo/child.vhd');
    note('xo baseline: uploading the child blocks once, copying them to the parent');
    await xoPristine.putBlocks(source, xoBlocks);
    await xoParent.putMetadata(blockCount);
    await xoParent.copyBlocksFrom(xoPristine, xoBlocks);
    const ours = { mergeMs: [] as number[], gcMs: [] as number[], totalMs: [] as number[] };
    const xo = new Map<number, number[]>(xoConcurrencies.map((c) => [c, []]));
    let full = s3.full;
    for (let round = 0; round < rounds; round++) {
      note(`merge round ${round + 1}/${rounds}: delta of ${CHANGED} blocks`);
      await changeBlocks(source, spreadBlocks(CHANGED, blockCount, round));
      await backup(s3Repo, DISK, { source });
      const delta = (await s3Repo.latest(DISK))!;
      if (delta.parent !== full.id || delta.blocksWritten !== CHANGED) throw new Error(`the delta stored ${delta.blocksWritten} blocks over ${delta.parent}, expected ${CHANGED} over ${full.id}`);
      const repo = s3Repo;
      let collected = 0;
      // As prune does: the removed backup's objects are the candidates the collection checks.
      let candidates = new Set<string>();
      const mergeMs = await msOf(async () => {
        candidates = await objectsNamedBy(repo, [full]);
        await mergeForward(repo, full, delta);
      });
      const gcMs = await msOf(async () => (collected = (await collectGarbage(repo, DISK, candidates)).objects));
      if (collected !== CHANGED) throw new Error(`garbage collection freed ${collected} objects, expected ${CHANGED}`);
      const backups = await s3Repo.backups(DISK);
      if (backups.length !== 1 || backups[0]!.id !== delta.id) throw new Error(`after the merge the disk lists ${backups.map((b) => b.id).join(', ')}, expected only ${delta.id}`);
      ours.mergeMs.push(mergeMs);
      ours.gcMs.push(gcMs);
      ours.totalMs.push(mergeMs + gcMs);
      full = backups[0]!;
      for (const c of xoConcurrencies) {
        note(`merge round ${round + 1}/${rounds}: xo baseline at ${c} in flight`);
        await xoChild.putMetadata(blockCount);
        await xoChild.copyBlocksFrom(xoPristine, xoBlocks);
        xo.get(c)!.push(await msOf(() => xoChild.mergeInto(xoParent, xoBlocks, c, blockCount)));
        const left = await xoChild.count('blocks/');
        if (left !== 0) throw new Error(`the xo merge left ${left} child blocks`);
      }
    }

    const oursMedian = median(ours.totalMs);
    const xoRows = xoConcurrencies.map((c) => {
      const ms = median(xo.get(c)!);
      return { concurrency: c, isXoDefault: c === XO_DEFAULT_CONCURRENCY, medianMs: round1(ms), msPerBlock: Math.round((ms / CHANGED) * 100) / 100, runsMs: xo.get(c)!.map(round1), ratioVsOurs: round1(ms / oursMedian) };
    });
    const folderOf = (op: IoRow['operation']) => ioRows.find((r) => r.repository === 'folder' && r.operation === op)!;
    const figures = {
      machine: { cpus: availableParallelism(), workDir: base, filesystem: await describeFilesystem(work) },
      diskMiB: size / MiB,
      changedBlocks: CHANGED,
      rounds,
      merge: {
        ours: {
          requestsInFlight: OUR_REQUESTS,
          medianMs: round1(oursMedian),
          medianMergeMs: round1(median(ours.mergeMs)),
          medianGcMs: round1(median(ours.gcMs)),
          runsMs: ours.totalMs.map(round1),
        },
        xo: xoRows,
        goal: 20,
        goalMetAtXoDefault: xoRows.find((r) => r.isXoDefault)!.ratioVsOurs >= 20,
        /** The merge up to its commit (the metadata rewrite), without freeing the replaced objects (what the dir layout's "reclaim" is locally). */
        mergeOnlyRatioAtXoDefault: round1(xoRows.find((r) => r.isXoDefault)!.medianMs / median(ours.mergeMs)),
      },
      io: ioRows.map((r) => ({ ...r, seconds: Math.round(r.seconds * 1000) / 1000, mibPerSecond: round1(r.mibPerSecond), s3VsFolder: r.repository === 's3' ? Math.round((r.mibPerSecond / folderOf(r.operation).mibPerSecond) * 100) / 100 : null })),
      api: 'in-process (backup, restore, mergeForward, collectGarbage)',
    };
    await writeResults('s3', { diskMiB: size / MiB, changedBlocks: CHANGED, rounds, server: `s3rver on 127.0.0.1, objects on ${figures.machine.filesystem}` }, figures);
    if (json) return console.log(JSON.stringify(figures));

    console.log(`merge of ${CHANGED} changed 2 MiB blocks on s3rver (127.0.0.1, objects on ${figures.machine.filesystem}, ${base}), disk ${size / MiB} MiB, ${rounds} rounds (median), ${figures.machine.cpus} CPUs shared with s3rver`);
    console.log(
      formatTable(
        ['method', 'in flight', 'median ms', 'ms/block', 'xo/ours'],
        [
          ['vhdvault objects: mergeForward + collectGarbage', String(OUR_REQUESTS), oursMedian.toFixed(1), (oursMedian / CHANGED).toFixed(2), '—'],
          ['  of which mergeForward (metadata)', String(OUR_REQUESTS), figures.merge.ours.medianMergeMs.toFixed(1), '—', `${figures.merge.mergeOnlyRatioAtXoDefault.toFixed(1)}× (xo default)`],
          ['  of which collectGarbage', String(OUR_REQUESTS), figures.merge.ours.medianGcMs.toFixed(1), '—', '—'],
          ...xoRows.map((r) => [`xo exploded: CopyObject + DeleteObject${r.isXoDefault ? ' (xo default)' : ''}`, String(r.concurrency), r.medianMs.toFixed(1), r.msPerBlock.toFixed(2), `${r.ratioVsOurs.toFixed(1)}×`]),
        ],
      ),
    );
    console.log(`goal (issue): xo/ours ≥ 20× at xo's default concurrency: ${figures.merge.goalMetAtXoDefault ? 'met' : 'NOT met'} with the freeing of the replaced objects (${xoRows.find((r) => r.isXoDefault)!.ratioVsOurs.toFixed(1)}×); the merge to its commit alone: ${figures.merge.mergeOnlyRatioAtXoDefault.toFixed(1)}×`);
    console.log('');
    console.log(`backup and restore of ${size / MiB} MiB of random data, in-process API, 1 run each; folder repository (dir layout) and s3rver's objects both on ${figures.machine.filesystem}, ${base}`);
    console.log(
      formatTable(
        ['operation', 'repository', 'seconds', 'MiB/s', 's3/folder'],
        figures.io.map((r) => [r.operation, r.repository, r.seconds.toFixed(2), r.mibPerSecond.toFixed(0), r.s3VsFolder === null ? '—' : r.s3VsFolder.toFixed(2)]),
      ),
    );
    console.log(JSON.stringify(figures));
  } finally {
    if (s3Repo?.storage instanceof S3Storage) s3Repo.storage.close();
    client?.destroy();
    await server?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
