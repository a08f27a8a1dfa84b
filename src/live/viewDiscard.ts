/**
 * Discard after read. Once the new backup holds a block (or needs nothing of
 * the view for it), the block is discarded on the frozen view's export: QEMU's
 * copy-before-write filter then stops copying old data there before guest
 * writes (they go straight to the disk) and frees it from the fleecing image.
 * A discarded range can no longer be read (QEMU fails the read), so a block
 * discarded too early fails the backup; it never becomes a hole in it.
 *
 * Only whole 2 MiB blocks are discarded, from a block boundary: QEMU 7.2
 * aborts (the guest dies) on a snapshot discard not aligned to the filter's
 * copy cluster, which is at most a block here. A disk's partial last block
 * is left alone.
 */
import type { NbdSource } from '../nbd/NbdSource.js';

/** Runs a discard; may measure around it (what it freed from a fleecing image). */
export type AroundDiscard = (discard: () => Promise<void>) => Promise<void>;

/** Most bytes one discard covers: an NBD request's length is 32 bits. */
const MAX_DISCARD = 1024 * 1024 * 1024;

export class ViewDiscard {
  /** Bytes discarded on the view. */
  discardedBytes = 0;
  /** Runs of settled blocks not sent yet, in the order they settled; a block that follows the last run joins it. */
  private readonly pending: Array<{ start: number; end: number }> = [];
  private inFlight: Promise<void> | null = null;
  private stopped = false;
  /** Why discards stopped early, if they did: worth a warning when the backup went through. */
  failure: string | null = null;

  constructor(
    private readonly source: NbdSource,
    private readonly around: AroundDiscard,
  ) {}

  /** The block is in the new backup, or never read: discard it (with what settled while a discard was in flight). */
  settled(block: number): void {
    if (this.stopped) return;
    const { blockSize, size } = this.source;
    const start = block * blockSize;
    const end = start + blockSize;
    if (end > size) return; // the partial last block: see above
    const last = this.pending.at(-1);
    if (last && last.end === start) last.end = end;
    else this.pending.push({ start, end });
    if (!this.inFlight) this.send();
  }

  /** Stop discarding (the backup is committed, or failed) and wait for the discard in flight. */
  async close(): Promise<void> {
    this.stopped = true;
    this.pending.length = 0;
    await this.inFlight;
  }

  /** One discard at a time: the view's export is also serving our reads, and QEMU's main loop the guest. */
  private send(): void {
    const first = this.pending[0]!;
    const length = Math.min(first.end - first.start, MAX_DISCARD);
    const start = first.start;
    first.start += length;
    if (first.start === first.end) this.pending.shift();
    this.inFlight = this.around(() => this.source.discard(start, length))
      .then(
        () => void (this.discardedBytes += length),
        (err: Error) => {
          // Nothing is lost: the guest's writes there are copied as before. A view that broke fails our reads, which say why.
          this.stopped = true;
          this.failure = err.message;
        },
      )
      .then(() => {
        this.inFlight = null;
        if (this.pending.length > 0 && !this.stopped) this.send();
      });
  }
}

export interface DiscardChoice {
  /** false: --no-discard. */
  enabled: boolean;
  around?: AroundDiscard;
  warn: (message: string) => void;
}

/**
 * Read `source` through `read` with discard after read, when it is wanted
 * and the export takes discards (a view exported read-only does not); the
 * discards in flight are waited for, whatever `read` does.
 */
export async function readDiscarding<T>(source: NbdSource, choice: DiscardChoice, read: (onSettled?: (block: number) => void) => Promise<T>): Promise<{ result: T; discardedBytes: number }> {
  const discard = choice.enabled && source.canDiscard ? new ViewDiscard(source, choice.around ?? ((fn) => fn())) : null;
  try {
    const result = await read(discard ? (block) => discard.settled(block) : undefined);
    await discard?.close();
    if (discard?.failure) choice.warn(`discarding what was read from the frozen view failed (${discard.failure}): the rest of the backup copied old data as without discard`);
    return { result, discardedBytes: discard?.discardedBytes ?? 0 };
  } finally {
    await discard?.close();
  }
}
