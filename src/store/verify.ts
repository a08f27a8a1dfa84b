import { VaultError } from '../util/errors.js';
import type { VhdChain } from '../vhd/VhdChain.js';
import { BLOCK_READ_AHEAD, orderedReadAhead } from '../util/pipeline.js';
import type { OnProgress } from '../util/progress.js';
import { DigestReader, digestOf, zeroDigest } from './digests.js';
import { openBackupChain } from './chain.js';
import { ObjectBackupDisk } from './ObjectBackupDisk.js';
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
      const checked = new Map<string, string | null>();
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
  return report;
}

async function verifyBackup(repo: Repository, meta: BackupMetadata, report: VerifyReport, onBlockRead: (block: number) => void, checked: Map<string, string | null>): Promise<void> {
  const problem = (block: number | null, text: string) => report.problems.push({ disk: meta.disk, id: meta.id, block, problem: text });
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
  const digestsPath = repo.digestsPath(meta.disk, meta.id);
  const objects = chain.top instanceof ObjectBackupDisk ? chain.top : null;
  const digests = objects
    ? objects.map
    : !(await repo.storage.head(repo.digestsKey(meta.disk, meta.id)))
    ? null
    : await DigestReader.open(digestsPath, meta.blockCount).catch((err: unknown) => {
        if (!(err instanceof VaultError)) throw err;
        problem(null, err.message);
        return null;
      });
  const member = chain.top;
  const stored: number[] = [];
  for (let b = 0; b < member.blockCount; b++) {
    if (!member.isAllocated(b)) continue;
    if (objects) {
      // An object another backup's check already read is not read again.
      const name = objects.map.digest(b).toString('hex');
      // Read once; a bad one is still reported for every backup that names it.
      if (checked.has(name)) {
        const known = checked.get(name);
        if (known) problem(b, known);
        continue;
      }
      checked.set(name, null);
    }
    stored.push(b);
  }
  /**
   * The block's digest as a restore sees it: read through the chain, which takes a
   * whole block from this backup alone and completes a partial one from its parents.
   */
  const read = async (block: number) => {
    try {
      const data = await chain.readBlock(block);
      return { digest: data ? digestOf(data) : null, error: null };
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      return { digest: null, error: err.message };
    }
  };
  let parentDigests: DigestReader | null = null;
  try {
    for await (const [block, r] of orderedReadAhead(stored, BLOCK_READ_AHEAD, read)) {
      report.blocks++;
      onBlockRead(block);
      const bad = r.error ?? (digests && (!r.digest || !r.digest.equals(await digests.get(block))) ? 'stored data does not match its digest' : null);
      if (bad === null) continue;
      problem(block, bad);
      if (objects) checked.set(objects.map.digest(block).toString('hex'), bad);
    }
    // In the objects layout the map is the whole disk, and every object it names was just read.
    if (!digests || objects) return;
    // A block this backup does not store is its parent's (or zero in a full): so must its digest be,
    // or a restore, which checks every block against these digests, would fail on it.
    parentDigests = meta.parent ? await DigestReader.open(repo.digestsPath(meta.disk, meta.parent), meta.blockCount) : null;
    const zero = zeroDigest(member.blockSize);
    for (let b = 0; b < meta.blockCount; b++) {
      if (member.isAllocated(b)) continue;
      const expected = parentDigests ? await parentDigests.get(b) : zero;
      if (!(await digests.get(b)).equals(expected)) problem(b, `recorded digest differs from ${parentDigests ? "the parent's" : 'an all-zero block'} although the backup does not store the block`);
    }
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    problem(null, err.message);
  } finally {
    await chain.close();
    await digests?.close();
    await parentDigests?.close();
  }
}
