import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Paces bytes to an average rate: each take() reserves its share of time and
 * waits until the reservation starts. Idle time is not banked beyond `burstMs`,
 * so the rate holds over any window longer than a block or two.
 */
export class RateLimiter {
  private next = 0;
  /** The pace of takeFirst(), kept apart from the queue of take(). */
  private nextFirst = 0;

  constructor(
    readonly bytesPerSecond: number,
    private readonly burstMs = 100,
  ) {
    if (!(bytesPerSecond > 0)) throw new RangeError('rate must be positive');
  }

  /** Wait for the turn of `bytes`; an abort ends the wait at once (a failed backup need not sit out its reservations). */
  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    const now = performance.now();
    this.next = Math.max(this.next, now - this.burstMs);
    const wait = this.next - now;
    this.next += (bytes / this.bytesPerSecond) * 1000;
    if (wait > 0) await sleep(wait, undefined, { signal });
  }

  /**
   * Bytes something is waiting on (a guest write held up by its copy):
   * paced among themselves at the rate, ahead of what take() has queued,
   * whose later turns move back by their share.
   */
  async takeFirst(bytes: number): Promise<void> {
    const now = performance.now();
    const share = (bytes / this.bytesPerSecond) * 1000;
    this.nextFirst = Math.max(this.nextFirst, now - this.burstMs);
    const wait = this.nextFirst - now;
    this.nextFirst += share;
    this.next = Math.max(this.next, now - this.burstMs) + share;
    if (wait > 0) await sleep(wait);
  }
}

/** A limiter that never waits (no limit set). */
export const unlimited = { take: async (_bytes: number, _signal?: AbortSignal): Promise<void> => undefined, takeFirst: async (_bytes: number): Promise<void> => undefined };
export type Limiter = Pick<RateLimiter, 'take' | 'takeFirst'>;

export function limiter(bytesPerSecond: number | undefined): Limiter {
  return bytesPerSecond ? new RateLimiter(bytesPerSecond) : unlimited;
}
