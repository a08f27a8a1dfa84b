/**
 * A bare NBD client for tests that misbehave on purpose: it does the fixed
 * newstyle handshake itself, then leaves the socket to the test (to send
 * requests and never read the replies, or to leave mid-way).
 */
import { connect, type Socket } from 'node:net';
import { Command, Option, OptionReply } from '../../src/nbd/constants.js';
import { encodeGo, encodeOption } from '../../src/nbd/handshake.js';
import { encodeRequest } from '../../src/nbd/transmission.js';

export interface OptionAnswer {
  type: number;
  message: string;
}

/** Bytes from a socket on demand; `closed` once the server hung up. */
export class RawConnection {
  /** What arrived and was not taken yet, as it came (joined only when taken: a 32 MiB reply comes in 64 KiB pieces). */
  private chunks: Buffer[] = [];
  private buffered = 0;
  closed = false;
  private waiters: Array<() => void> = [];

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  static async open(path: string): Promise<RawConnection> {
    const socket = connect(path);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawConnection(socket);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** The next `n` bytes, or null when the server closed first. */
  async take(n: number): Promise<Buffer | null> {
    while (this.buffered < n && !this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
    if (this.buffered < n) return null;
    const all = Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.buffered -= n;
    return all.subarray(0, n);
  }

  /** Resolves once the server has closed the connection. */
  async closedByServer(): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  /** Read the greeting, send the client flags (fixed newstyle, no zeroes). */
  async greet(): Promise<void> {
    const greeting = await this.take(18);
    if (!greeting || greeting.subarray(0, 8).toString() !== 'NBDMAGIC') throw new Error('no NBD greeting');
    this.socket.write(Buffer.from([0, 0, 0, 3]));
  }

  /** GO on `name`: the final reply (ACK, or an error with its message); the INFO replies are skipped. */
  async go(name = ''): Promise<OptionAnswer> {
    this.socket.write(encodeOption(Option.GO, encodeGo({ name, infos: [] })));
    for (;;) {
      const header = await this.take(20);
      if (!header) throw new Error('the server closed instead of replying to GO');
      const type = header.readUInt32BE(12);
      const payload = (await this.take(header.readUInt32BE(16)))!;
      if (type === OptionReply.INFO) continue;
      return { type, message: type === OptionReply.ACK ? '' : payload.toString('utf8') };
    }
  }

  /** Send READ requests for these (offset, length) pairs, cookies 0, 1, … */
  sendReads(reads: Array<[number, number]>): void {
    const requests = reads.map(([offset, length], i) => encodeRequest({ type: Command.READ, flags: 0, cookie: BigInt(i), offset, length }));
    this.socket.write(Buffer.concat(requests));
  }

  /** A simple reply to a READ of `length` bytes: its error and data. */
  async readReply(length: number): Promise<{ error: number; cookie: bigint; data: Buffer | null }> {
    const header = await this.take(16);
    if (!header) throw new Error('the server closed instead of replying');
    const error = header.readUInt32BE(4);
    return { error, cookie: header.readBigUInt64BE(8), data: error === 0 ? await this.take(length) : null };
  }
}
