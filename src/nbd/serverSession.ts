/**
 * One client's transmission phase: read a request, check it, run it, reply.
 * Requests run concurrently (up to MAX_IN_FLIGHT) and are answered as each
 * finishes, so replies may come out of order. A request that is wrong but
 * well framed gets an error reply and the session goes on; a broken frame
 * (bad magic, a write too large to drain) ends the connection.
 *
 * Memory: a READ's reply and a WRITE's payload are held against the
 * connection's and the server's byte budgets from before the request starts
 * until the reply has left our buffers (the payload: until the export took
 * it). While a request does not fit, nothing more is read from that client.
 * A client that leaves gets nothing more started: the requests it sent and
 * we had not started are dropped.
 */
import type { Socket } from 'node:net';
import { Command, CommandFlag, Errno, nameOf } from './constants.js';
import { describeErrno, errnoOf, NbdProtocolError } from './errors.js';
import { drained } from './drained.js';
import type { FrameReader } from './FrameReader.js';
import type { ByteBudget } from './ByteBudget.js';
import { MAX_EXTENTS, MAX_IN_FLIGHT, MAX_REQUEST, SMALL_REPLY_HIGH_WATER } from './limits.js';
import { ALLOCATION_CONTEXT_ID, type Negotiated } from './serverHandshake.js';
import {
  encodeBlockStatusChunk,
  encodeDataChunk,
  encodeErrorChunk,
  encodeHoleChunk,
  encodeSimpleReply,
  type Extent,
  parseRequest,
  REQUEST_SIZE,
  type Request,
} from './transmission.js';

/** A request refused before it reaches the export. */
class Refusal {
  constructor(
    readonly errno: number,
    readonly message: string,
  ) {}
}

const KNOWN_COMMANDS = new Set<number>(Object.values(Command));
const KNOWN_FLAGS = CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.DF | CommandFlag.REQ_ONE | CommandFlag.FAST_ZERO;

/** A request let in: its refusal (if it gets one), its WRITE payload, and how to give back what it holds of the budgets. */
interface Admitted {
  refusal: Refusal | null;
  payload: Buffer | null;
  release: () => void;
}

/** Structured chunk headers and offsets: a READ reply's bytes beyond its data, generously. */
const REPLY_OVERHEAD = 4096;

export class ServerSession {
  private inFlight = 0;
  private idle: (() => void) | null = null;
  private slot: (() => void) | null = null;
  private stopping = false;
  private corked = false;
  /** Budgeted reply bytes handed to the socket and not yet sent on: the rest of its buffer is small replies. */
  private budgetedUnsent = 0;
  /** When the socket last finished a write (or had nothing to write): see watchStalls. */
  private lastWriteDone = Date.now();
  /** Fires when the peer is gone (or stop()): waits for the budget end, and nothing more is started. */
  private readonly halt = new AbortController();

  constructor(
    private readonly socket: Socket,
    private readonly reader: FrameReader,
    private readonly negotiated: Negotiated,
    private readonly peer: string,
    /** Where an export's failure is told in full (the client gets only an errno). */
    private readonly log: (message: string) => void,
    /** This connection's budget (a child of the server's). */
    private readonly budget: ByteBudget,
    /** Hang up on a client whose waiting replies have not moved on for this long (ms). */
    private readonly replyStall: number,
  ) {
    socket.once('close', () => this.halt.abort());
  }

  /**
   * Watch that replies waiting in our buffers move on: a client that stops
   * reading them holds its share of the server's budget, and with it every
   * other client's reads. Progress is a write the socket finished (Node says
   * no more of a write in progress), so a client must take a whole reply
   * within the stall time: 32 MiB in 60 s by default, which any live client does.
   * Returns the watch's stop.
   */
  private watchStalls(): () => void {
    const timer = setInterval(() => {
      if (this.socket.writableLength === 0) this.lastWriteDone = Date.now();
      const stalled = Date.now() - this.lastWriteDone;
      if (stalled < this.replyStall) return;
      clearInterval(timer);
      this.log(`${this.peer}: took none of its replies for ${(stalled / 1000).toFixed(1)} s with ${this.socket.writableLength} bytes of them waiting: disconnected (it kept other clients' reads waiting)`);
      this.socket.destroy();
    }, Math.max(10, Math.min(1000, this.replyStall / 4)));
    timer.unref();
    return () => clearInterval(timer);
  }

  /** The peer left or stop() was called. Destroyed counts: 'close' (which fires `halt`) comes a tick later. */
  private get ended(): boolean {
    return this.halt.signal.aborted || this.socket.destroyed;
  }

  /** Stop reading requests; run() returns once those in flight are answered. */
  stop(): void {
    this.stopping = true;
    this.reader.cancel();
    this.halt.abort();
  }

  /** Serve until the client disconnects (DISC or EOF) or stop(); throws NbdProtocolError on a broken frame. */
  async run(): Promise<void> {
    let dropped = false;
    const unwatch = this.watchStalls();
    try {
      while (!this.stopping && !this.ended) {
        await this.roomForReplies();
        const header = await this.reader.readOrEnd(REQUEST_SIZE, 'request header').catch((err: unknown) => {
          if (this.stopping) return null;
          throw err;
        });
        if (header === null) break;
        const req = parseRequest(header);
        if (!req) throw new NbdProtocolError(this.peer, 'request has a bad magic');
        if (req.type === Command.DISC) break;
        const admitted = await this.admit(req);
        if (!admitted) {
          dropped = true;
          break;
        }
        this.start(req, admitted);
      }
    } finally {
      if (this.ended && !this.stopping && (dropped || this.inFlight > 0)) {
        this.log(`${this.peer}: disconnected with ${this.inFlight} requests unanswered; the requests not started are dropped`);
      }
      if (this.inFlight > 0) await new Promise<void>((r) => (this.idle = r));
      unwatch();
    }
  }

  /**
   * Below MAX_IN_FLIGHT, and the small replies (not budgeted) sent on: a
   * client that does not read its replies stops being read from.
   */
  private async roomForReplies(): Promise<void> {
    while (this.inFlight >= MAX_IN_FLIGHT) await new Promise<void>((r) => (this.slot = r));
    while (this.socket.writableLength - this.budgetedUnsent > SMALL_REPLY_HIGH_WATER && !this.socket.destroyed) await drained(this.socket);
  }

  /**
   * Wait until the request's bytes fit this connection's budget and the
   * server's (no further request is read meanwhile), then take a WRITE's
   * payload. Null when the peer left or the server stops: the request is
   * dropped unstarted, with everything the peer sent after it.
   */
  private async admit(req: Request): Promise<Admitted | null> {
    // Too large to drain safely: the spec lets the server hang up instead.
    if (req.type === Command.WRITE && req.length > MAX_REQUEST) throw new NbdProtocolError(this.peer, `write of ${req.length} bytes (at most ${MAX_REQUEST})`);
    const refusal = this.check(req);
    const bytes = refusal ? 0 : this.bytesHeld(req);
    const release = bytes > 0 ? await this.budget.take(bytes, this.halt.signal) : () => {};
    if (!release || this.ended) {
      release?.();
      return null;
    }
    if (req.type !== Command.WRITE) return { refusal, payload: null, release };
    try {
      if (refusal) await this.reader.skip(req.length, 'write payload');
      return { refusal, payload: refusal ? null : await this.reader.read(req.length, 'write payload'), release };
    } catch (err) {
      release();
      throw err;
    }
  }

  /** What a request holds while in progress: a READ its reply, a WRITE its payload, BLOCK_STATUS its largest reply. */
  private bytesHeld(req: Request): number {
    if (req.type === Command.READ) return req.length + REPLY_OVERHEAD;
    if (req.type === Command.WRITE) return req.length;
    if (req.type === Command.BLOCK_STATUS) return 8 * Math.min(MAX_EXTENTS, req.length) + REPLY_OVERHEAD;
    return 0;
  }

  private start(req: Request, admitted: Admitted): void {
    this.inFlight++;
    void this.handle(req, admitted).finally(() => {
      this.inFlight--;
      const slot = this.slot;
      this.slot = null;
      slot?.();
      if (this.inFlight === 0) this.idle?.();
    });
  }

  private async handle(req: Request, { refusal, payload, release }: Admitted): Promise<void> {
    try {
      if (refusal) throw refusal;
      await this.execute(req, payload, release);
    } catch (err) {
      const refused = err instanceof Refusal ? err : null;
      const errno = refused ? refused.errno : errnoOf(err);
      const message = refused ? refused.message : `${nameOf(Command, req.type)} failed: ${describeErrno(errno)}`;
      if (!refused) this.log(`${this.peer}: ${nameOf(Command, req.type)} at ${req.offset} (+${req.length}): ${(err as Error)?.message ?? String(err)}`);
      release();
      this.send(this.negotiated.structured && this.hasPayload(req) ? [encodeErrorChunk(req.cookie, errno, message)] : [encodeSimpleReply(req.cookie, errno)]);
    }
  }

  private hasPayload(req: Request): boolean {
    return req.type === Command.READ || req.type === Command.BLOCK_STATUS;
  }

  /**
   * A reply's parts are written back to back (nothing else can come between:
   * this runs to its end), and replies finished in the same tick leave in one
   * system call (cork until the next tick).
   */
  private send(parts: Buffer[], release?: () => void): void {
    if (this.socket.destroyed) return release?.();
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    const done = () => void (this.lastWriteDone = Date.now());
    if (!release) {
      parts.forEach((part, i) => this.socket.write(part, i === parts.length - 1 ? done : undefined));
      return;
    }
    // The budget is given back once the socket has sent the reply on (or was destroyed, which calls back too).
    const bytes = parts.reduce((n, p) => n + p.length, 0);
    this.budgetedUnsent += bytes;
    parts.forEach((part, i) => {
      if (i < parts.length - 1) this.socket.write(part);
      else
        this.socket.write(part, () => {
          done();
          this.budgetedUnsent -= bytes;
          release();
        });
    });
  }

  /** What the session refuses before the export sees the request. */
  private check(req: Request): Refusal | null {
    const exp = this.negotiated.export;
    if ((req.flags & ~KNOWN_FLAGS) !== 0) return new Refusal(Errno.EINVAL, `unknown command flags 0x${req.flags.toString(16)}`);
    if (!KNOWN_COMMANDS.has(req.type)) return new Refusal(Errno.EINVAL, `unknown command ${req.type}`);
    const writes = req.type === Command.WRITE || req.type === Command.TRIM || req.type === Command.WRITE_ZEROES;
    if (writes && !exp.writable) return new Refusal(Errno.EPERM, 'the export is read-only');
    if (req.type === Command.FLUSH) return null;
    if (req.type === Command.BLOCK_STATUS && !this.negotiated.allocationContext) return new Refusal(Errno.EINVAL, 'no meta context was selected');
    if (req.length === 0 && req.type !== Command.CACHE) return new Refusal(Errno.EINVAL, 'zero-length request');
    if (req.offset + req.length > exp.size) return new Refusal(writes ? Errno.ENOSPC : Errno.EINVAL, `request past the end of the export (${exp.size} bytes)`);
    if (req.type === Command.READ && req.length > MAX_REQUEST) return new Refusal(Errno.EINVAL, `read of ${req.length} bytes (at most ${MAX_REQUEST})`);
    return null;
  }

  private async execute(req: Request, payload: Buffer | null, release: () => void): Promise<void> {
    const exp = this.negotiated.export;
    const fua = (req.flags & CommandFlag.FUA) !== 0;
    switch (req.type) {
      case Command.READ:
        return this.read(req, release);
      case Command.WRITE:
        await exp.write!(req.offset, payload!, fua);
        break;
      case Command.WRITE_ZEROES:
        if (!exp.writeZeroes) return unsupported();
        await exp.writeZeroes(req.offset, req.length, fua);
        break;
      case Command.TRIM:
        if (!exp.trim) return unsupported();
        await exp.trim(req.offset, req.length, fua);
        break;
      case Command.FLUSH:
        await exp.flush?.();
        break;
      case Command.CACHE:
        break; // a hint: our reads need no warming
      case Command.BLOCK_STATUS:
        return this.blockStatus(req, release);
    }
    release(); // a WRITE's payload is the export's now
    this.send([encodeSimpleReply(req.cookie, 0)]);
  }

  private async read(req: Request, release: () => void): Promise<void> {
    const pieces = await this.negotiated.export.read(req.offset, req.length);
    if (!this.negotiated.structured) {
      const parts = [encodeSimpleReply(req.cookie, 0), ...pieces.map((p) => ('data' in p ? p.data : Buffer.alloc(p.hole)))];
      return this.send(parts, release);
    }
    const noHole = (req.flags & CommandFlag.NO_HOLE) !== 0;
    const parts: Buffer[] = [];
    pieces.forEach((p, i) => {
      const done = i === pieces.length - 1;
      if ('data' in p) parts.push(...encodeDataChunk(req.cookie, p.offset, p.data, done));
      else if (noHole) parts.push(...encodeDataChunk(req.cookie, p.offset, Buffer.alloc(p.hole), done));
      else parts.push(encodeHoleChunk(req.cookie, p.offset, p.hole, done));
    });
    this.send(parts, release);
  }

  private async blockStatus(req: Request, release: () => void): Promise<void> {
    let extents = await this.negotiated.export.allocation(req.offset, req.length);
    if ((req.flags & CommandFlag.REQ_ONE) !== 0) extents = extents.slice(0, 1);
    extents = clip(extents.slice(0, MAX_EXTENTS), req.length);
    this.send([encodeBlockStatusChunk(req.cookie, ALLOCATION_CONTEXT_ID, extents, true)], release);
  }
}

async function unsupported(): Promise<never> {
  throw new Refusal(Errno.ENOTSUP, 'not supported by this export');
}

/** Extents never reach past the request (the spec lets a server stop short, not run over). */
function clip(extents: Extent[], length: number): Extent[] {
  const out: Extent[] = [];
  let left = length;
  for (const e of extents) {
    if (left <= 0 || e.length <= 0) break;
    out.push({ length: Math.min(e.length, left), flags: e.flags });
    left -= e.length;
  }
  return out;
}
