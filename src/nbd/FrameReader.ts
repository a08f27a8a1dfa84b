import type { Socket } from 'node:net';
import { NbdProtocolError } from './errors.js';
import { READ_HIGH_WATER } from './limits.js';

/**
 * Exact reads from a socket, for one consumer at a time. Bytes are buffered
 * up to a high-water mark (READ_HIGH_WATER unless told) and the socket is
 * paused beyond that, so a peer that sends faster than we handle costs
 * bounded memory. Tells an end at a message boundary (the peer hung up:
 * readOrEnd() gives null) from an end in the middle of one (a protocol error
 * naming what was cut short).
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private failure: Error | null = null;
  private cancelled = false;
  private wake: (() => void) | null = null;

  constructor(
    private readonly socket: Socket,
    /** Names the peer in errors. */
    private readonly peer: string,
    /** Bytes buffered before the socket is paused. */
    private readonly highWater = READ_HIGH_WATER,
  ) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      if (this.buffered >= this.highWater) socket.pause();
      this.notify();
    });
    socket.on('end', () => this.finish());
    socket.on('close', () => this.finish());
    socket.on('error', (err) => {
      this.failure ??= err;
      this.notify();
    });
  }

  /** `length` bytes, which must all arrive: `what` names the message in an error. */
  async read(length: number, what: string): Promise<Buffer> {
    return (await this.take(length, what, false))!;
  }

  /** Like read(), but a clean end of the connection before the first byte gives null. */
  readOrEnd(length: number, what: string): Promise<Buffer | null> {
    return this.take(length, what, true);
  }

  /**
   * Copy the next `length` bytes straight into `target` at `at` (a READ's
   * data into the caller's buffer), without assembling them first.
   */
  async readInto(target: Buffer, at: number, length: number, what: string): Promise<void> {
    let filled = 0;
    while (filled < length) {
      if (this.buffered === 0) await this.waitForData(what, filled, length);
      const chunk = this.chunks[0]!;
      const n = Math.min(chunk.length, length - filled);
      chunk.copy(target, at + filled, 0, n);
      filled += n;
      this.buffered -= n;
      if (n === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(n);
    }
    if (this.buffered < this.highWater && this.socket.isPaused()) this.socket.resume();
  }

  /** Wait until at least one byte is buffered; fails like take() when none can come. */
  private async waitForData(what: string, got: number, length: number): Promise<void> {
    while (this.buffered === 0) {
      if (this.cancelled) throw new NbdProtocolError(this.peer, 'reading stopped');
      if (this.failure) throw new NbdProtocolError(this.peer, `connection failed while reading ${what}: ${this.failure.message}`);
      if (this.ended) throw new NbdProtocolError(this.peer, `connection closed in the middle of ${what} (${got} of ${length} bytes)`);
      this.socket.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  /** Consume `length` bytes without keeping them (a refused request's payload). */
  async skip(length: number, what: string): Promise<void> {
    for (let left = length; left > 0; ) {
      const n = Math.min(left, this.highWater);
      await this.read(n, what);
      left -= n;
    }
  }

  /** Make the pending and every later read fail (the session is stopping). */
  cancel(): void {
    this.cancelled = true;
    this.notify();
  }

  private finish(): void {
    this.ended = true;
    this.notify();
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  private async take(length: number, what: string, atBoundary: boolean): Promise<Buffer | null> {
    if (length === 0) return Buffer.alloc(0);
    while (this.buffered < length) {
      if (this.cancelled) throw new NbdProtocolError(this.peer, 'reading stopped');
      if (this.failure) throw new NbdProtocolError(this.peer, `connection failed while reading ${what}: ${this.failure.message}`);
      if (this.ended) {
        if (atBoundary && this.buffered === 0) return null;
        throw new NbdProtocolError(this.peer, `connection closed in the middle of ${what} (${this.buffered} of ${length} bytes)`);
      }
      // A frame larger than the high-water mark needs the socket flowing until it is whole.
      this.socket.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
    let out: Buffer;
    const first = this.chunks[0]!;
    if (first.length >= length) {
      out = first.subarray(0, length);
      if (first.length === length) this.chunks.shift();
      else this.chunks[0] = first.subarray(length);
    } else {
      out = Buffer.allocUnsafe(length);
      let filled = 0;
      while (filled < length) {
        const chunk = this.chunks[0]!;
        const n = Math.min(chunk.length, length - filled);
        chunk.copy(out, filled, 0, n);
        filled += n;
        if (n === chunk.length) this.chunks.shift();
        else this.chunks[0] = chunk.subarray(n);
      }
    }
    this.buffered -= length;
    if (this.buffered < this.highWater && this.socket.isPaused()) this.socket.resume();
    return out;
  }
}
