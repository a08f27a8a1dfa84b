/**
 * An NBD client: one connection, negotiated by clientHandshake(), then typed
 * requests. Requests are sent as soon as a slot of the window is free and are
 * kept in flight by cookie; one reader loop routes every reply (simple, or
 * structured chunks, in any order and interleaved) to its request, checking
 * each against the request it answers.
 *
 * Run state: connected, closed (we sent DISC, or the server hung up while
 * nothing was owed) or dead (a broken reply, a lost connection, a timeout).
 * A request refused by the server (an error reply) fails alone: NbdRequestError.
 * Anything that breaks the framing or the protocol kills the connection: every
 * request in flight fails with the same NbdProtocolError, and so does every
 * later call. Every public method checks the state first.
 */
import { createConnection, type Socket } from 'node:net';
import { UsageError } from '../util/errors.js';
import { clientHandshake, type BlockSizes, type ClientNegotiated } from './clientHandshake.js';
import { Chunk, Command, type CommandType, CommandFlag, Errno, isChunkError, nameOf, ReplyFlag, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TransmissionFlag } from './constants.js';
import { describeErrno, NbdProtocolError, NbdRequestError } from './errors.js';
import { drained } from './drained.js';
import { FrameReader } from './FrameReader.js';
import { Malformed } from './handshake.js';
import { MAX_EXTENTS, MAX_IN_FLIGHT, MAX_REQUEST } from './limits.js';
import {
  CHUNK_HEADER_REST,
  type ChunkHeader,
  DATA_OFFSET_SIZE,
  encodeRequest,
  type Extent,
  HOLE_PAYLOAD_SIZE,
  parseBlockStatusChunk,
  parseChunkHeaderRest,
  parseDataOffset,
  parseErrorChunk,
  parseHoleChunk,
  parseSimpleReplyRest,
  REPLY_MAGIC_SIZE,
  SIMPLE_REPLY_REST,
} from './transmission.js';
import { InFlight, type Submission } from './clientRequest.js';
import { type NbdAddress, parseNbdUri } from './uri.js';

export type RunState = 'connected' | 'closed' | 'dead';

/** How long the server may make no progress while it owes us an answer: long enough for a busy disk behind it. */
export const DEFAULT_TIMEOUT_MS = 60_000;
export const TIMEOUT_ENV = 'VHDVAULT_NBD_TIMEOUT';
/**
 * Requests in flight: enough for NbdSource's 4 blocks in 256 KiB READs to go
 * out at once. qemu-nbd works on 16 per client; the rest wait in its socket,
 * so it never waits on us for the next one.
 */
export const DEFAULT_WINDOW = 32;
/**
 * Chunks one reply may carry beyond one per 512 bytes asked for (the spec's
 * advice for data and hole runs): room for error chunks and a final NONE.
 * Bounds a reply that never ends (error chunks without DONE), which the
 * timeout cannot see, since it is traffic.
 */
const SPARE_CHUNKS = 64;
/** The largest error chunk: errno, 16-bit message length, the message, an offset. */
const MAX_ERROR_CHUNK = 6 + 0xffff + 8;
const MAX_BLOCK_STATUS_CHUNK = 4 + 8 * MAX_EXTENTS;
/** A request's length field is 32 bits. */
const MAX_LENGTH = 0xffffffff;
/** After DISC (or ABORT) the server should hang up; we wait this long at most before cutting the connection. */
const HANG_UP_GRACE_MS = 2000;

export interface ConnectOptions {
  /** Meta contexts to select (e.g. base:allocation); see hasContext(). */
  contexts?: string[];
  /** Milliseconds without progress while the server owes an answer; default VHDVAULT_NBD_TIMEOUT (seconds), else 60 s. */
  timeoutMs?: number;
  /** Requests in flight at once, 1 to MAX_IN_FLIGHT. */
  window?: number;
}

export interface WriteOptions {
  /** Force unit access: reply only once the data is on stable storage. */
  fua?: boolean;
}

/** The timeout from VHDVAULT_NBD_TIMEOUT (seconds), else the default. */
export function defaultTimeoutMs(): number {
  const text = process.env[TIMEOUT_ENV];
  if (text === undefined || text === '') return DEFAULT_TIMEOUT_MS;
  const seconds = Number(text);
  if (!Number.isFinite(seconds) || seconds <= 0 || seconds > 86400) throw new UsageError(`${TIMEOUT_ENV}="${text}" is not a number of seconds from 0 to 86400`);
  return Math.round(seconds * 1000);
}

export class NbdClient {
  private state: RunState | 'connecting' = 'connecting';
  /** Why the connection died (or why the server's hang-up ended it): what every later call throws. */
  private cause: Error | null = null;
  private disconnecting = false;
  private negotiated: ClientNegotiated = { size: 0, flags: 0, structured: false, contexts: new Map(), blockSizes: null };
  private readonly reader: FrameReader;
  private readonly inFlight = new Map<bigint, InFlight>();
  private nextCookie = 1n;
  private slotsTaken = 0;
  private readonly slotWaiters: Array<() => void> = [];
  private idleWaiters: Array<() => void> = [];

  private constructor(
    /** Names the server in every error: the URI. */
    readonly peer: string,
    private readonly socket: Socket,
    private readonly timeoutMs: number,
    private readonly window: number,
  ) {
    this.reader = new FrameReader(socket, peer);
    // Inactivity in both directions; it matters only while the server owes us something.
    // (A listener, not setTimeout's callback: that one fires once, and quiet idle spells are normal.)
    socket.setTimeout(timeoutMs);
    socket.on('timeout', () => this.onQuiet());
  }

  /** Connect and negotiate; fails with one line naming the URI (and cleans up the socket). */
  static async connect(target: string | NbdAddress, options: ConnectOptions = {}): Promise<NbdClient> {
    const address = typeof target === 'string' ? parseNbdUri(target) : target;
    const timeoutMs = options.timeoutMs ?? defaultTimeoutMs();
    const window = options.window ?? DEFAULT_WINDOW;
    if (!Number.isInteger(window) || window < 1 || window > MAX_IN_FLIGHT) throw new RangeError(`window must be 1 to ${MAX_IN_FLIGHT}`);
    const ep = address.endpoint;
    const socket = ep.transport === 'unix' ? createConnection({ path: ep.socket }) : createConnection({ host: ep.host, port: ep.port });
    if (ep.transport === 'tcp') socket.setNoDelay(true);
    const client = new NbdClient(address.uri, socket, timeoutMs, window);
    try {
      await client.connected();
      client.negotiated = await clientHandshake(socket, client.reader, { exportName: address.exportName, contexts: options.contexts ?? [] }, address.uri);
    } catch (err) {
      // The watchdog's reason beats the read it interrupted.
      const failure = client.cause ?? asNbdError(err, address.uri);
      if (failure instanceof NbdRequestError) {
        client.state = 'closed';
        await client.hangUp(); // a refusal: the server gets the ABORT we sent, then we close
      } else client.die(failure);
      throw failure;
    }
    client.state = 'connected';
    void client.receive();
    return client;
  }

  /** (Callers only ever hold a client that finished connecting.) */
  get runState(): RunState {
    return this.state === 'connecting' ? 'dead' : this.state;
  }
  get size(): number {
    return this.negotiated.size;
  }
  /** Transmission flags (TransmissionFlag). */
  get flags(): number {
    return this.negotiated.flags;
  }
  get structuredReplies(): boolean {
    return this.negotiated.structured;
  }
  get blockSizes(): BlockSizes | null {
    return this.negotiated.blockSizes;
  }
  /** Requests must start and end on this (the export's end excepted). */
  get minimumBlock(): number {
    return this.negotiated.blockSizes?.minimum ?? 1;
  }
  /** The largest READ or WRITE: the server's maximum, never above MAX_REQUEST. */
  get maximumPayload(): number {
    return Math.min(this.negotiated.blockSizes?.maximum ?? MAX_REQUEST, MAX_REQUEST);
  }
  get readOnly(): boolean {
    return (this.negotiated.flags & TransmissionFlag.READ_ONLY) !== 0;
  }
  /** Whether the server selected this meta context for the export (BLOCK_STATUS can ask about it). */
  hasContext(name: string): boolean {
    return this.negotiated.contexts.has(name);
  }

  /** `length` bytes at `offset` (holes read as zeros). */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    await this.readInto(buf, 0, offset, length);
    return buf;
  }

  /**
   * Read into `target` at `targetAt`, split into requests of at most
   * maximumPayload sent together; resolves to the bytes that came as data
   * (the rest came as holes, written here as zeros).
   */
  async readInto(target: Buffer, targetAt: number, offset: number, length: number): Promise<number> {
    if (targetAt < 0 || targetAt + length > target.length) throw new RangeError('read target too small');
    this.checkRange(Command.READ, offset, length);
    const parts: Array<Promise<InFlight>> = [];
    for (let done = 0; done < length; done += this.maximumPayload) {
      const n = Math.min(this.maximumPayload, length - done);
      parts.push(this.submit({ type: Command.READ, offset: offset + done, length: n, target, targetAt: targetAt + done }));
    }
    return (await Promise.all(parts)).reduce((sum, r) => sum + r.dataBytes, 0);
  }

  /**
   * The extents of `context` from `offset`: consecutive, clipped to `length`,
   * possibly covering less of it (the server may answer short: ask again from
   * where they end).
   */
  async blockStatus(offset: number, length: number, context: string): Promise<Extent[]> {
    this.ensureOpen();
    const contextId = this.negotiated.contexts.get(context);
    if (contextId === undefined) throw new NbdRequestError(this.peer, `the server did not select the meta context "${context}"`, Errno.ENOTSUP);
    this.checkRange(Command.BLOCK_STATUS, offset, length);
    const r = await this.submit({ type: Command.BLOCK_STATUS, offset, length, contextId });
    return r.extents!;
  }

  async write(offset: number, data: Buffer, options: WriteOptions = {}): Promise<void> {
    this.checkWrite(Command.WRITE, options.fua);
    this.checkRange(Command.WRITE, offset, data.length);
    if (data.length > this.maximumPayload) throw this.refuse(Command.WRITE, offset, data.length, `above the largest request (${this.maximumPayload} bytes)`);
    await this.submit({ type: Command.WRITE, flags: options.fua ? CommandFlag.FUA : 0, offset, length: data.length, payload: data });
  }

  async flush(): Promise<void> {
    this.ensureOpen();
    if (!(this.flags & TransmissionFlag.SEND_FLUSH)) throw new NbdRequestError(this.peer, 'FLUSH: the server does not offer it', Errno.ENOTSUP);
    await this.submit({ type: Command.FLUSH, offset: 0, length: 0 });
  }

  async trim(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    this.checkWrite(Command.TRIM, options.fua);
    this.checkRange(Command.TRIM, offset, length);
    await this.submit({ type: Command.TRIM, flags: options.fua ? CommandFlag.FUA : 0, offset, length });
  }

  /** Write zeros; with noHole the server must allocate them rather than punch a hole. */
  async writeZeroes(offset: number, length: number, options: WriteOptions & { noHole?: boolean } = {}): Promise<void> {
    this.checkWrite(Command.WRITE_ZEROES, options.fua);
    this.checkRange(Command.WRITE_ZEROES, offset, length);
    const flags = (options.fua ? CommandFlag.FUA : 0) | (options.noHole ? CommandFlag.NO_HOLE : 0);
    await this.submit({ type: Command.WRITE_ZEROES, flags, offset, length });
  }

  /**
   * Let the requests in flight finish, send DISC and close. Never throws: a
   * dead connection is simply released (close paths must not hide the error
   * that brought them there).
   */
  async disconnect(): Promise<void> {
    if (this.state === 'connected' && !this.disconnecting) {
      this.disconnecting = true;
      for (const w of this.slotWaiters.splice(0)) w(); // requests not yet sent fail now
      while (this.slotsTaken > 0 || this.inFlight.size > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
      if (this.state === 'connected') {
        this.socket.write(encodeRequest({ flags: 0, type: Command.DISC, cookie: this.nextCookie++, offset: 0, length: 0 }));
        this.state = 'closed';
        this.cause ??= new NbdProtocolError(this.peer, 'the connection is closed');
      }
    }
    await this.hangUp();
  }

  // ---- requests ----

  private ensureOpen(): void {
    if (this.state === 'connected' && !this.disconnecting) return;
    throw this.cause ?? new NbdProtocolError(this.peer, 'the connection is closed');
  }

  private refuse(type: CommandType, offset: number, length: number, problem: string): NbdRequestError {
    return new NbdRequestError(this.peer, `${nameOf(Command, type)} at ${offset} (+${length}): ${problem}`, Errno.EINVAL);
  }

  /** What we must not send: empty, past the end, off the server's minimum block size. */
  private checkRange(type: CommandType, offset: number, length: number): void {
    this.ensureOpen();
    const end = offset + length;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || length > MAX_LENGTH) throw this.refuse(type, offset, length, 'not a valid range');
    if (end > this.size) throw this.refuse(type, offset, length, `past the end of the export (${this.size} bytes)`);
    const min = this.minimumBlock;
    if (offset % min !== 0 || (end % min !== 0 && end !== this.size)) throw this.refuse(type, offset, length, `not aligned to the server's ${min}-byte minimum block size`);
  }

  private checkWrite(type: CommandType, fua: boolean | undefined): void {
    this.ensureOpen();
    const needs: Partial<Record<CommandType, number>> = { [Command.TRIM]: TransmissionFlag.SEND_TRIM, [Command.WRITE_ZEROES]: TransmissionFlag.SEND_WRITE_ZEROES };
    if (this.readOnly) throw new NbdRequestError(this.peer, `${nameOf(Command, type)}: the export is read-only`, Errno.EPERM);
    const flag = needs[type];
    if (flag !== undefined && !(this.flags & flag)) throw new NbdRequestError(this.peer, `${nameOf(Command, type)}: the server does not offer it`, Errno.ENOTSUP);
    if (fua && !(this.flags & TransmissionFlag.SEND_FUA)) throw new NbdRequestError(this.peer, `${nameOf(Command, type)}: the server does not offer FUA`, Errno.ENOTSUP);
  }

  /** Send one request once a slot is free; resolves when its whole reply is in. */
  private async submit(s: Submission): Promise<InFlight> {
    while (this.slotsTaken >= this.window) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
      this.ensureOpen(); // it may have died while we waited
    }
    this.ensureOpen();
    this.slotsTaken++;
    try {
      const req = new InFlight(this.nextCookie++, s.type, s.offset, s.length, s.target ?? null, s.targetAt ?? 0, s.contextId ?? -1);
      this.inFlight.set(req.cookie, req);
      const header = encodeRequest({ flags: s.flags ?? 0, type: s.type, cookie: req.cookie, offset: s.offset, length: s.length });
      // Header and payload in one tick: no other request can come between them.
      let flowing = this.socket.write(header);
      if (s.payload) flowing = this.socket.write(s.payload);
      if (!flowing) await drained(this.socket);
      return await req.done;
    } finally {
      this.slotsTaken--;
      this.slotWaiters.shift()?.();
      this.wakeIdle();
    }
  }

  private wakeIdle(): void {
    if (this.slotsTaken > 0 || this.inFlight.size > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  // ---- replies ----

  /** The one reader: routes every reply to its request until the connection ends. */
  private async receive(): Promise<void> {
    try {
      for (;;) {
        const magic = await this.reader.readOrEnd(REPLY_MAGIC_SIZE, 'a reply');
        if (magic === null) return this.serverHungUp();
        const m = magic.readUInt32BE(0);
        if (m === SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (m === STRUCTURED_REPLY_MAGIC) await this.chunk();
        else throw new NbdProtocolError(this.peer, `a reply has a bad magic (0x${m.toString(16).padStart(8, '0')})`);
      }
    } catch (err) {
      if (this.state === 'connected') this.die(asNbdError(err, this.peer));
    }
  }

  private serverHungUp(): void {
    if (this.state !== 'connected') return;
    if (this.inFlight.size > 0) {
      const first = this.inFlight.values().next().value!;
      return this.die(new NbdProtocolError(this.peer, `the server closed the connection with ${this.inFlight.size} request(s) unanswered (${first.what})`));
    }
    this.state = 'closed';
    this.cause = new NbdProtocolError(this.peer, 'the server closed the connection');
    this.socket.destroy();
    this.wakeAll();
  }

  private request(cookie: bigint): InFlight {
    const req = this.inFlight.get(cookie);
    if (!req) throw new NbdProtocolError(this.peer, `a reply carries cookie ${cookie}, which matches no request in flight`);
    return req;
  }

  private protocol(req: InFlight, problem: string): NbdProtocolError {
    return new NbdProtocolError(this.peer, `${req.what}: ${problem}`);
  }

  private async simpleReply(): Promise<void> {
    const { error, cookie } = parseSimpleReplyRest(await this.reader.read(SIMPLE_REPLY_REST, 'a simple reply'));
    const req = this.request(cookie);
    if (error !== 0) {
      // No payload follows an error, so the framing holds whatever the command.
      req.error = { errno: error, message: '', offset: null };
    } else if (req.type === Command.READ) {
      // Without a length in the reply, only our request says how much data follows.
      if (this.negotiated.structured) throw this.protocol(req, 'answered by a simple reply, which structured replies forbid for READ');
      req.coverage.add(req.offset, req.offset + req.length);
      await this.receiveData(req, req.offset, req.length, 'the data of a simple reply');
    } else if (req.type === Command.BLOCK_STATUS) {
      throw this.protocol(req, 'answered by a simple reply without extents');
    }
    this.complete(req);
  }

  private async chunk(): Promise<void> {
    const h = parseChunkHeaderRest(await this.reader.read(CHUNK_HEADER_REST, 'a structured reply header'));
    if (!this.negotiated.structured) throw new NbdProtocolError(this.peer, 'a structured reply chunk, but structured replies were not negotiated');
    const req = this.request(h.cookie);
    const bad = (problem: string) => this.protocol(req, problem);
    const maxChunks = SPARE_CHUNKS + Math.ceil(req.length / 512);
    if (++req.chunks > maxChunks) throw bad(`more than ${maxChunks} chunks in one reply`);
    const payload = (what: string) => (h.length > 0 ? this.reader.read(h.length, `${req.what}: ${what}`) : Promise.resolve(Buffer.alloc(0)));
    try {
      switch (h.type) {
        case Chunk.NONE:
          if (h.length !== 0) throw bad(`a NONE chunk carries ${h.length} bytes`);
          if (!(h.flags & ReplyFlag.DONE)) throw bad('a NONE chunk is not marked final');
          break;
        case Chunk.OFFSET_DATA:
          await this.dataChunk(req, h);
          break;
        case Chunk.OFFSET_HOLE: {
          if (req.type !== Command.READ) throw bad('an OFFSET_HOLE chunk answers a request that is not a READ');
          if (h.length !== HOLE_PAYLOAD_SIZE) throw bad(`an OFFSET_HOLE chunk of ${h.length} bytes (${HOLE_PAYLOAD_SIZE} expected)`);
          const hole = parseHoleChunk(await payload('OFFSET_HOLE chunk'));
          this.cover(req, hole.offset, hole.length, 'OFFSET_HOLE');
          const at = req.targetAt + hole.offset - req.offset;
          req.target!.fill(0, at, at + hole.length);
          break;
        }
        case Chunk.BLOCK_STATUS:
          if (req.type !== Command.BLOCK_STATUS) throw bad('a BLOCK_STATUS chunk answers a request that is not BLOCK_STATUS');
          if (h.length > MAX_BLOCK_STATUS_CHUNK) throw bad(`a BLOCK_STATUS chunk claims ${h.length} bytes (at most ${MAX_BLOCK_STATUS_CHUNK})`);
          this.statusChunk(req, parseBlockStatusChunk(await payload('BLOCK_STATUS chunk')));
          break;
        default: {
          // Unknown non-error chunks cannot be understood, so the reply cannot be trusted: hang up.
          if (!isChunkError(h.type)) throw bad(`unknown reply chunk type ${h.type}`);
          if (h.length < 6 || h.length > MAX_ERROR_CHUNK) throw bad(`an error chunk of ${h.length} bytes`);
          const e = parseErrorChunk(h.type, await payload('error chunk'));
          if (e.offset !== null && (e.offset < req.offset || e.offset >= req.offset + req.length)) throw bad(`an error at offset ${e.offset}, outside the request`);
          req.error ??= e;
        }
      }
    } catch (err) {
      if (err instanceof Malformed) throw bad(err.message);
      throw err;
    }
    if (h.flags & ReplyFlag.DONE) this.complete(req);
  }

  private async dataChunk(req: InFlight, h: ChunkHeader): Promise<void> {
    if (req.type !== Command.READ) throw this.protocol(req, 'an OFFSET_DATA chunk answers a request that is not a READ');
    // Checked before a byte of it is read: a length no read can need is a lie, not something to buffer.
    if (h.length <= DATA_OFFSET_SIZE || h.length - DATA_OFFSET_SIZE > req.length) {
      throw this.protocol(req, `an OFFSET_DATA chunk claims ${h.length} bytes for a read of ${req.length}`);
    }
    const offset = parseDataOffset(await this.reader.read(DATA_OFFSET_SIZE, `${req.what}: OFFSET_DATA chunk`));
    const length = h.length - DATA_OFFSET_SIZE;
    this.cover(req, offset, length, 'OFFSET_DATA');
    await this.receiveData(req, offset, length, 'OFFSET_DATA chunk');
  }

  /** Copy `length` bytes of data from the socket straight into the request's target. */
  private async receiveData(req: InFlight, offset: number, length: number, what: string): Promise<void> {
    await this.reader.readInto(req.target!, req.targetAt + offset - req.offset, length, `${req.what}: ${what}`);
    req.dataBytes += length;
  }

  /** A content chunk must lie inside its request and overlap nothing answered before. */
  private cover(req: InFlight, offset: number, length: number, kind: string): void {
    const end = offset + length;
    if (offset < req.offset || end > req.offset + req.length) throw this.protocol(req, `an ${kind} chunk at ${offset} (+${length}) lies outside the request`);
    if (!req.coverage.add(offset, end)) throw this.protocol(req, `an ${kind} chunk at ${offset} (+${length}) overlaps data already received`);
  }

  private statusChunk(req: InFlight, chunk: { contextId: number; extents: Extent[] }): void {
    if (![...this.negotiated.contexts.values()].includes(chunk.contextId)) throw this.protocol(req, `extents for meta context id ${chunk.contextId}, which was never selected`);
    if (req.contextsSeen.has(chunk.contextId)) throw this.protocol(req, `two BLOCK_STATUS chunks for meta context id ${chunk.contextId}`);
    req.contextsSeen.add(chunk.contextId);
    // Only the last extent may run past the request (the server saw further at no cost): clip it.
    const extents: Extent[] = [];
    let at = 0;
    for (const e of chunk.extents) {
      if (at >= req.length) throw this.protocol(req, 'the extents run past the end of the request');
      extents.push({ length: Math.min(e.length, req.length - at), flags: e.flags });
      at += e.length;
    }
    if (chunk.contextId === req.contextId) req.extents = extents;
  }

  /** The final chunk (or simple reply) is in: settle the request. */
  private complete(req: InFlight): void {
    if (req.error) {
      this.inFlight.delete(req.cookie);
      const { errno, message, offset } = req.error;
      const where = offset !== null ? ` at offset ${offset}` : '';
      return req.reject(new NbdRequestError(this.peer, `${req.what} failed${where}: ${describeErrno(errno)}${message ? ` (server: ${message})` : ''}`, errno));
    }
    // Still in flight when these throw: the connection dies and takes it along.
    if (req.type === Command.READ && req.coverage.covered !== req.length) {
      throw this.protocol(req, `the reply ended with ${req.length - req.coverage.covered} of ${req.length} bytes never sent`);
    }
    if (req.type === Command.BLOCK_STATUS && req.extents === null) throw this.protocol(req, 'the reply carries no extents for the meta context asked about');
    this.inFlight.delete(req.cookie);
    req.resolve(req);
  }

  // ---- the connection's end ----

  /** The watchdog: quiet for timeoutMs while an answer is owed means the server is gone or stuck. */
  private onQuiet(): void {
    const seconds = `${this.timeoutMs / 1000} s`;
    const hint = `(${TIMEOUT_ENV}=<seconds> sets the limit)`;
    if (this.state === 'connecting') return this.die(new NbdProtocolError(this.peer, `no answer from the server in ${seconds} while connecting ${hint}`));
    if (this.state === 'connected' && this.inFlight.size > 0) {
      const first = this.inFlight.values().next().value!;
      this.die(new NbdProtocolError(this.peer, `no reply from the server in ${seconds} to ${first.what} ${hint}`));
    }
  }

  /** The connection cannot go on: fail everything in flight with `err`, and every later call too. */
  private die(err: Error): void {
    if (this.state === 'dead') return;
    this.state = 'dead';
    this.cause ??= err;
    const failure = this.cause;
    for (const req of this.inFlight.values()) req.reject(failure);
    this.inFlight.clear();
    this.reader.cancel();
    this.socket.destroy();
    this.wakeAll();
  }

  private wakeAll(): void {
    for (const w of this.slotWaiters.splice(0)) w();
    this.wakeIdle();
  }

  /** Close our side, give the server a moment to close its own, then let go of the socket whatever it does. */
  private async hangUp(): Promise<void> {
    if (this.socket.destroyed) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => this.socket.destroy(), Math.min(HANG_UP_GRACE_MS, this.timeoutMs));
      this.socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
      this.socket.end();
    });
    this.reader.cancel();
  }

  /** Resolves once the socket is connected; a failure names the cause in plain words. */
  private connected(): Promise<void> {
    return new Promise((resolve, reject) => {
      const onConnect = () => {
        this.socket.off('error', onError);
        this.socket.off('close', onClose);
        resolve();
      };
      const onError = (err: NodeJS.ErrnoException) => reject(new NbdProtocolError(this.peer, `cannot connect: ${describeConnectError(err)}`));
      const onClose = () => reject(this.cause ?? new NbdProtocolError(this.peer, 'cannot connect: the connection closed'));
      this.socket.once('connect', onConnect);
      this.socket.once('error', onError);
      this.socket.once('close', onClose);
    });
  }
}

function describeConnectError(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ENOENT':
      return 'no such socket (is the NBD server running?)';
    case 'ECONNREFUSED':
      return 'connection refused (is the NBD server running?)';
    case 'EACCES':
      return 'permission denied';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'unknown host';
    default:
      return err.message;
  }
}

/** Anything thrown on the way in, as the one-line error the CLI prints. */
function asNbdError(err: unknown, peer: string): Error {
  if (err instanceof NbdProtocolError || err instanceof NbdRequestError) return err;
  if (err instanceof Malformed) return new NbdProtocolError(peer, err.message);
  return new NbdProtocolError(peer, `unexpected failure: ${(err as Error)?.message ?? String(err)}`);
}
