import { vmDiskName, vmNames, vmRecords } from './vmRecord.js';
import { VaultError } from '../util/errors.js';
import type { VhdDisk } from '../vhd/disk.js';
import type { VhdChain } from '../vhd/VhdChain.js';
import { BLOCK_READ_AHEAD, orderedReadAhead } from '../util/pipeline.js';
import type { OnProgress } from '../util/progress.js';
import { checkDigestsBinding } from './digests.js';
import { openBackupChain, openDigests } from './chain.js';
import { SharedObjectError } from './finding.js';
import type { Digests } from './layouts/Layout.js';
import { fileFindings } from './inspect.js';
import { readingDisk } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';

export interface VerifyProblem {
  disk: string;
  /** Null when the problem is the disk's metadata itself. */
  id: string | null;
  /** Null when the problem is the backup's structure rather than one block. */
  block: number | null;
  problem: string;
}

export interface VerifyReport {
  backups: number;
  blocks: number;
  problems: VerifyProblem[];
}

/**
 * Re-read every block each backup stores and compare it with the digest the
 * backup recorded; check each backup's structure and its chain (parents found,
 * UUIDs matching). Reports every problem; changes nothing.
 */
export async function verify(repo: Repository, disk?: string, options: { onProgress?: OnProgress; /** Only these backups (a job's `verify: new`): the blocks they store. */ only?: ReadonlySet<string> } = {}): Promise<VerifyReport> {
  const report: VerifyReport = { backups: 0, blocks: 0, problems: [] };
  const disks = disk ? [disk] : await repo.disks();
  // Progress is the position through all backups' block ranges: its total is known before any is opened.
  let total = 0;
  const chosen = (m: BackupMetadata) => !options.only || options.only.has(m.id);
  for (const d of disks) total += (await repo.backups(d)).filter(chosen).reduce((n, m) => n + m.blockCount, 0);
  let before = 0;
  let bytes = 0;
  for (const d of disks) {
    // As a reader: a merge or deletion never runs beside the checks (access.ts). A disk that
    // cannot be read at all (a damaged merge journal) is one problem; the other disks are still checked.
    await readingDisk(repo, d, 'verify', async () => {
      const backups = await repo.backups(d, (err) => report.problems.push({ disk: d, id: null, block: null, problem: err.message }));
      const findings = await fileFindings(repo, d, backups);
      for (const f of findings) if (!options.only || f.id === null || options.only.has(f.id)) report.problems.push({ disk: d, id: f.id, block: null, problem: f.problem });
      const unreadable = new Set(findings.filter((f) => f.kind === 'missing-data' || f.kind === 'missing-parent').map((f) => f.id));
      // Objects layout: backups share block objects; each is read once per run.
      const checked: Checked = new Map();
      for (const meta of backups.filter(chosen)) {
        report.backups++;
        if (!unreadable.has(meta.id)) {
          await verifyBackup(repo, meta, report, (block) => options.onProgress?.(before + block + 1, total, (bytes += meta.blockSize)), checked);
        }
        before += meta.blockCount;
        options.onProgress?.(Math.min(before, total), total, bytes);
      }
    }).catch((err: unknown) => {
      if (!(err instanceof VaultError)) throw err;
      report.problems.push({ disk: d, id: null, block: null, problem: err.message });
    });
  }
  if (!disk && !options.only) await verifyVmRecords(repo, report);
  return report;
}

/** Every VM backup record readable, and every disk backup it names there: a VM backup restores whole or is reported. */
async function verifyVmRecords(repo: Repository, report: VerifyReport): Promise<void> {
  for (const vm of await vmNames(repo)) {
    const records = await vmRecords(repo, vm).catch((err: unknown) => {
      if (!(err instanceof VaultError)) throw err;
      report.problems.push({ disk: `VM ${vm}`, id: null, block: null, problem: err.message });
      return [];
    });
    for (const r of records) {
      for (const [target, id] of Object.entries(r.disks)) {
        const disk = vmDiskName(vm, target);
        if (!(await repo.storage.head(repo.metadataKey(disk, id)))) report.problems.push({ disk: `VM ${vm}`, id: r.id, block: null, problem: `names backup ${id} of disk ${disk}, which does not exist: this VM backup cannot be restored whole` });
      }
    }
  }
}

/**
 * Shared objects (by digest) already read in this run: null when good, else what
 * is wrong with it, as found by the first backup that named it.
 */
type Checked = Map<string, VaultError | string | null>;

/** What is wrong with a shared object, said of backup `id`, whose map names it too. */
function saidOf(bad: VaultError | string, id: string): string {
  if (typeof bad === 'string') return bad;
  return bad instanceof SharedObjectError ? bad.namedBy(id).message : bad.message;
}

async function verifyBackup(repo: Repository, meta: BackupMetadata, report: VerifyReport, onBlockRead: (block: number) => void, checked: Checked): Promise<void> {
  const problem: Problem = (block, text) => void report.problems.push({ disk: meta.disk, id: meta.id, block, problem: text });
  let chain: VhdChain;
  try {
    // Opening the chain (by metadata) checks structure, parents and UUIDs; its top member is this backup's own data.
    // From the store, not a local cache: verify checks what is stored.
    chain = await openBackupChain(repo, meta, { fresh: true });
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    problem(null, err.message);
    return;
  }
  if (chain.blockCount !== meta.blockCount) problem(null, `holds ${chain.blockCount} blocks, metadata records ${meta.blockCount}`);
  // Without its digests a backup's blocks are still read, so unreadable ones are still named
  // (a missing digests file is already reported by fileFindings).
  const layout = repo.layoutOf(meta);
  const digests = !(await repo.storage.head(repo.digestsKey(meta.disk, meta.id)))
    ? null
    : await openDigests(repo, meta, { fresh: true }).catch((err: unknown) => {
        if (!(err instanceof VaultError)) throw err;
        problem(null, err.message);
        return null;
      });
  // Bound to the backup by their SHA-256: another backup's digests, or damaged ones, are said so
  // (and the blocks are still checked against them, naming each that disagrees).
  if (digests) {
    const k = repo.digestsKey(meta.disk, meta.id);
    try {
      checkDigestsBinding(digests.bytes ?? (await repo.storage.get(k)), meta, repo.storage.describe(k));
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      problem(null, err.message);
    }
  }
  // Blocks shared by digest (objects layout): named by their digest.
  const shared = layout.sharedBlocks && digests ? digests : null;
  const member = chain.top;
  const stored = await blocksToRead(member, shared, checked, (block, bad) => problem(block, saidOf(bad, meta.id)));
  /**
   * The block's digest as a restore sees it: read through the chain, which takes a
   * whole block from this backup alone and completes a partial one from its parents.
   */
  const read = async (block: number) => {
    try {
      const data = await chain.readBlock(block);
      return { digest: data ? repo.digester.of(data) : null, error: null };
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      return { digest: null, error: err };
    }
  };
  let parentDigests: Digests | null = null;
  try {
    for await (const [block, r] of orderedReadAhead(stored, BLOCK_READ_AHEAD, read)) {
      report.blocks++;
      onBlockRead(block);
      const bad = r.error ?? (digests && (!r.digest || !r.digest.equals(await digests.get(block))) ? 'stored data does not match its digest' : null);
      if (bad === null) continue;
      problem(block, saidOf(bad, meta.id));
      if (shared) checked.set((await shared.get(block)).toString('hex'), bad);
    }
    // Where a backup's map is the whole disk, every object it names was just read.
    if (!digests || layout.sharedBlocks) return;
    parentDigests = meta.parent ? await openDigests(repo, { ...(await repo.backup(meta.disk, meta.parent)), blockCount: meta.blockCount }, { fresh: true }) : null;
    await checkUnstored(meta, member, digests, parentDigests, repo.digester.zero(member.blockSize), problem);
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    problem(null, err.message);
  } finally {
    await chain.close();
    await digests?.close();
    await parentDigests?.close();
  }
}

type Problem = (block: number | null, text: string) => void;

/**
 * The blocks a backup stores that this run still has to read. Blocks shared by
 * digest (objects layout) are read once per run: one already read is not read
 * again, and a bad one is reported for every backup that names it.
 */
async function blocksToRead(member: VhdDisk, shared: Digests | null, checked: Checked, known: (block: number, bad: VaultError | string) => void): Promise<number[]> {
  const stored: number[] = [];
  for (let b = 0; b < member.blockCount; b++) {
    if (!member.isAllocated(b)) continue;
    if (shared) {
      const name = (await shared.get(b)).toString('hex');
      if (checked.has(name)) {
        const bad = checked.get(name);
        if (bad) known(b, bad);
        continue;
      }
      checked.set(name, null);
    }
    stored.push(b);
  }
  return stored;
}

/**
 * A block this backup does not store is its parent's (or zero in a full): so
 * must its digest be, or a restore, which checks every block against these
 * digests, would fail on it.
 */
async function checkUnstored(meta: BackupMetadata, member: VhdDisk, digests: Digests, parentDigests: Digests | null, zero: Buffer, problem: Problem): Promise<void> {
  for (let b = 0; b < meta.blockCount; b++) {
    if (member.isAllocated(b)) continue;
    const expected = parentDigests ? await parentDigests.get(b) : zero;
    if (!(await digests.get(b)).equals(expected)) problem(b, `recorded digest differs from ${parentDigests ? "the parent's" : 'an all-zero block'} although the backup does not store the block`);
  }
}
