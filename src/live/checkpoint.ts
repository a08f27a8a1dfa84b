/**
 * Checkpoints: the QEMU dirty bitmap each live backup leaves on the disk's
 * format node (`vhdvault-<backup id>`), recording every write since that
 * backup's point in time. The next backup reads only what it marks, but only
 * if it can be proved whole: it belongs to the latest backup, exists, is
 * consistent and has been recording all along. On success the older one
 * goes; on failure the new one is merged back into it, so no write is lost.
 */
import { createHash } from 'node:crypto';
import type { Checkpoint } from '../store/repository.js';
import type { BackupMetadata } from '../store/repository.js';
import { blockDirtyBitmapEnable, blockDirtyBitmapMerge, blockDirtyBitmapRemove, queryNamedBlockNodes, transaction, type DirtyBitmapInfo } from '../qmp/commands.js';
import { OUR_PREFIX } from './guestPath.js';
import type { QmpClient } from '../qmp/QmpClient.js';

export interface PreviousCheckpoint {
  /** The latest backup's checkpoint, if it names a bitmap on this node (valid or not): removed once a new one takes over. */
  recorded: string | null;
  /** The bitmap a delta may be built from, or null. */
  valid: string | null;
  /** Why not, when there is a previous backup. */
  note?: string;
}

/**
 * `vhdvault-<tag>-<backup id>`, the tag naming the repository and disk (8 hex
 * digits of SHA-256 of the repository's real path, NUL, the disk name): one
 * QEMU disk backed up into two repositories keeps a checkpoint for each, and
 * a run removes only its own leftovers.
 */
export function checkpointTag(repositoryPath: string, disk: string): string {
  return `${OUR_PREFIX}${createHash('sha256').update(`${repositoryPath}\0${disk}`).digest('hex').slice(0, 8)}-`;
}

export const checkpointName = (tag: string, backupId: string) => `${tag}${backupId}`;

/** The named bitmaps on `node` (a copy-before-write filter adds an anonymous one while it runs). */
async function bitmapsOf(qmp: QmpClient, node: string): Promise<DirtyBitmapInfo[]> {
  const all = (await queryNamedBlockNodes(qmp)).find((n) => n.nodeName === node)?.dirtyBitmaps ?? [];
  return all.filter((b) => typeof b.name === 'string');
}

/** Remove this repository's and disk's bitmaps (`tag`) on `node` that killed runs left, all but `keep` (the latest backup's checkpoint). */
export async function removeLeftoverBitmaps(qmp: QmpClient, node: string, tag: string, keep: string | null): Promise<void> {
  for (const b of await bitmapsOf(qmp, node)) {
    if (b.name.startsWith(tag) && b.name !== keep) await blockDirtyBitmapRemove(qmp, node, b.name);
  }
}

/** The checkpoint a delta may come from: the latest backup's, if its bitmap can be trusted. */
export async function previousCheckpoint(qmp: QmpClient, node: string, latest: BackupMetadata | undefined): Promise<PreviousCheckpoint> {
  if (!latest) return { recorded: null, valid: null };
  const fallback = (recorded: string | null, why: string) => ({ recorded, valid: null, note: `${why}: every allocated block read and compared by digest` });
  const c = latest.checkpoint as Partial<Checkpoint> | undefined;
  if (!c || typeof c.bitmap !== 'string' || typeof c.node !== 'string') return fallback(null, `no previous checkpoint (backup ${latest.id} was not taken from QEMU)`);
  if (c.node !== node) return fallback(null, `previous checkpoint "${c.bitmap}" is on node "${c.node}", not "${node}"`);
  const b = (await bitmapsOf(qmp, node)).find((x) => x.name === c.bitmap);
  if (!b) return fallback(null, `previous checkpoint bitmap "${c.bitmap}" is missing on node "${node}" (QEMU restarted, or a transient bitmap was lost)`);
  if (b.inconsistent) return fallback(b.name, `previous checkpoint bitmap "${c.bitmap}" is inconsistent (QEMU stopped uncleanly)`);
  if (!b.recording) return fallback(b.name, `previous checkpoint bitmap "${c.bitmap}" is not recording (a backup was cut short)`);
  return { recorded: b.name, valid: b.name };
}

/**
 * The bitmap hand-over around the point in time. start() adds the new
 * checkpoint before the filter goes in; handOver() disables the previous one
 * after (it must be, to be exported): a write between the two is in both,
 * read twice, never missed.
 */
export class CheckpointHandOver {
  private added = false;
  private previousDisabled = false;

  constructor(
    private readonly qmp: QmpClient,
    private readonly node: string,
    /** qcow2 stores bitmaps at a clean stop; others keep them in memory only. */
    private readonly persistent: boolean,
    readonly next: string,
    readonly previous: PreviousCheckpoint,
  ) {}

  async start(): Promise<void> {
    await CheckpointHandOver.startAll(this.qmp, [this]);
  }

  async handOver(): Promise<void> {
    await CheckpointHandOver.handOverAll(this.qmp, [this]);
  }

  /** start() of several disks' checkpoints in one transaction: one round trip of the window a guest waits through. */
  static async startAll(qmp: QmpClient, all: readonly CheckpointHandOver[]): Promise<void> {
    await transaction(qmp, all.map((h) => ({ type: 'block-dirty-bitmap-add', data: { node: h.node, name: h.next, persistent: h.persistent } })));
    for (const h of all) h.added = true;
  }

  /** handOver() of several disks' checkpoints in one transaction. */
  static async handOverAll(qmp: QmpClient, all: readonly CheckpointHandOver[]): Promise<void> {
    const handing = all.filter((h) => h.previous.valid !== null);
    await transaction(qmp, handing.map((h) => ({ type: 'block-dirty-bitmap-disable', data: { node: h.node, name: h.previous.valid } })));
    for (const h of handing) h.previousDisabled = true;
  }

  /** The backup is committed: the new checkpoint takes over, the older one goes. */
  async succeeded(): Promise<void> {
    if (this.previous.recorded !== null) await blockDirtyBitmapRemove(this.qmp, this.node, this.previous.recorded);
  }

  /**
   * The backup failed: the previous checkpoint gets back the writes it did
   * not record (merged from the new one) and records again. If the merge
   * fails it stays disabled, so the next backup does not trust it.
   */
  async failed(): Promise<void> {
    if (!this.added) return;
    const prev = this.previous.valid;
    if (prev !== null && this.previousDisabled) {
      await blockDirtyBitmapMerge(this.qmp, { node: this.node, target: prev, bitmaps: [this.next] });
      await blockDirtyBitmapEnable(this.qmp, this.node, prev);
    }
    await blockDirtyBitmapRemove(this.qmp, this.node, this.next);
  }
}
