/**
 * The client's bookkeeping for one request: what it asked, where its data
 * goes, and what its reply has brought so far (NbdClient routes each reply
 * chunk here by cookie and checks it against this).
 */
import { Command, type CommandType, nameOf } from './constants.js';
import type { ChunkError, Extent } from './transmission.js';

/** Byte ranges of one READ already answered, kept sorted and merged: catches overlaps and tells when the read is whole. */
export class Coverage {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  covered = 0;

  /** Record [start, end); false when it overlaps something already answered. */
  add(start: number, end: number): boolean {
    const { starts, ends } = this;
    let lo = 0;
    let hi = starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (starts[mid]! <= start) lo = mid + 1;
      else hi = mid;
    }
    const i = lo; // ranges before i start at or before `start`
    if (i > 0 && ends[i - 1]! > start) return false;
    if (i < starts.length && starts[i]! < end) return false;
    const joinsPrevious = i > 0 && ends[i - 1] === start;
    const joinsNext = i < starts.length && starts[i] === end;
    if (joinsPrevious && joinsNext) {
      ends[i - 1] = ends[i]!;
      starts.splice(i, 1);
      ends.splice(i, 1);
    } else if (joinsPrevious) ends[i - 1] = end;
    else if (joinsNext) starts[i] = start;
    else {
      starts.splice(i, 0, start);
      ends.splice(i, 0, end);
    }
    this.covered += end - start;
    return true;
  }
}

/** One request in flight, and what its reply has brought so far. */
export class InFlight {
  readonly what: string;
  /** READ: where the data goes, and which bytes have come. */
  coverage = new Coverage();
  dataBytes = 0;
  chunks = 0;
  /** BLOCK_STATUS: the extents of the context asked about, and the context ids answered. */
  extents: Extent[] | null = null;
  readonly contextsSeen = new Set<number>();
  /** The first error chunk (the spec says not to trust anything else in an errored reply). */
  error: ChunkError | null = null;
  readonly done: Promise<InFlight>;
  resolve!: (r: InFlight) => void;
  reject!: (err: Error) => void;

  constructor(
    readonly cookie: bigint,
    readonly type: CommandType,
    readonly offset: number,
    readonly length: number,
    readonly target: Buffer | null,
    readonly targetAt: number,
    readonly contextId: number,
  ) {
    this.what = `${nameOf(Command, type)} at ${offset} (+${length})`;
    this.done = new Promise<InFlight>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // Failed by the reader loop, possibly before its sender awaits it: never an unhandled rejection.
    this.done.catch(() => undefined);
  }
}

export interface Submission {
  type: CommandType;
  flags?: number;
  offset: number;
  length: number;
  payload?: Buffer;
  target?: Buffer;
  targetAt?: number;
  contextId?: number;
}
