/**
 * A QMP client: one connection to QEMU's monitor socket. connect() reads the
 * greeting, refuses QEMU older than 7.2 and sends qmp_capabilities to enter
 * command mode. Then execute() sends commands, each with its own id. One
 * reader routes every message: a reply to the call with its id (a reply to an
 * id nobody waits for, a call that timed out, is dropped), an event to the
 * listeners (events.ts).
 *
 * Run state: connecting, connected, closed (by close()) or dead (QEMU hung up
 * or broke the protocol). When the connection ends, every pending call fails
 * with the reason; every later call throws QmpStateError. A refused command
 * fails alone (QmpCommandError). Note that QEMU's monitor serves one client at
 * a time: a second one connects but gets no greeting until the first leaves.
 */
import { createConnection, type Socket } from 'node:net';
import { QmpCommandError, QmpDisconnectedError, QmpError, QmpProtocolError, QmpStateError, QmpTimeoutError } from './errors.js';
import { EventHub, type EventFilter, type EventListener, type EventWait, seconds } from './events.js';
import {
  encodeCommand,
  formatVersion,
  isErrorReply,
  isGreeting,
  isReturn,
  LineSplitter,
  Malformed,
  parseEvent,
  parseLine,
  preview,
  type QmpGreeting,
  type QmpVersion,
  versionAtLeast,
} from './qmpWire.js';

export type RunState = 'connecting' | 'connected' | 'closed' | 'dead';

/** Per call, unless told otherwise: generous, since blockdev-add opens images and blockdev-del may flush. */
export const DEFAULT_TIMEOUT_MS = 60_000;
/** The copy-before-write filter and snapshot-access driver, with the options live backup uses, are solid from 7.2. */
export const MIN_VERSION: QmpVersion = { major: 7, minor: 2, micro: 0 };
/** After close() ends our side, how long QEMU gets to close its own before we cut the socket. */
const HANG_UP_GRACE_MS = 1000;

export interface QmpConnectOptions {
  /** Default for each call, and the bound on connecting and negotiating; default 60 s. */
  timeoutMs?: number;
}

export interface ExecuteOptions {
  timeoutMs?: number;
}

interface Pending {
  command: string;
  args: object | undefined;
  resolve(value: unknown): void;
  reject(err: QmpError): void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  private state: RunState = 'connecting';
  /** Why the client is no longer connected: what pending and later calls are told. */
  private cause: QmpError | null = null;
  private greeting: QmpGreeting['QMP'] | null = null;
  /** Some bytes have come from the peer. */
  private heard = false;
  private onGreeting: ((greeting: QmpGreeting['QMP']) => void) | null = null;
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private readonly lines = new LineSplitter();
  private readonly events: EventHub;

  private constructor(
    /** The QMP socket's path: the subject of every error. */
    readonly socketPath: string,
    private readonly socket: Socket,
    readonly timeoutMs: number,
  ) {
    this.events = new EventHub(socketPath);
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (err) => this.die(this.connectionError(err)));
    socket.on('close', () => this.die(hungUp(socketPath)));
  }

  /** Connect, check the version and negotiate; fails with one line naming the socket, leaving nothing open. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const client = new QmpClient(socketPath, createConnection({ path: socketPath }), timeoutMs);
    try {
      const greeting = await client.greeted();
      const version = greeting.version.qemu;
      if (!versionAtLeast(version, MIN_VERSION)) {
        throw new QmpError(socketPath, `QEMU ${formatVersion(version)} is too old: live backups need ${MIN_VERSION.major}.${MIN_VERSION.minor} or later`);
      }
      await client.send('qmp_capabilities', undefined, timeoutMs);
    } catch (err) {
      const failure = client.cause ?? (err as QmpError);
      client.die(failure);
      throw failure;
    }
    client.state = 'connected';
    return client;
  }

  get runState(): RunState {
    return this.state;
  }

  /** QEMU's version, from the greeting. */
  get version(): QmpVersion {
    return this.greeting!.version.qemu;
  }

  /** Run `command`; resolves to its `return` value. T is the caller's word for its shape. */
  execute<T = unknown>(command: string, args?: object, options: ExecuteOptions = {}): Promise<T> {
    if (this.state !== 'connected') {
      const why = this.cause && this.state === 'dead' ? `: ${this.cause.problem}` : '';
      return Promise.reject(new QmpStateError(this.socketPath, `cannot run ${command}: the QMP connection is ${this.state}${why}`));
    }
    return this.send(command, args, options.timeoutMs ?? this.timeoutMs) as Promise<T>;
  }

  /** Call `listener` for every event named `name` (or ANY_EVENT); returns the unsubscribe. */
  on(name: string, listener: EventListener): () => void {
    return this.events.on(name, listener);
  }

  /**
   * The next event `name` passing `filter`, listening from this call on:
   * create the wait, then run the command that causes the event, then await
   * it (cancel() it if the command failed).
   */
  waitForEvent(name: string, filter: EventFilter = () => true, timeoutMs = this.timeoutMs): EventWait {
    return this.events.waitFor(name, filter, timeoutMs);
  }

  /** Hang up. Pending calls fail with QmpDisconnectedError; never throws. */
  async close(): Promise<void> {
    if (this.state === 'closed' || this.state === 'dead') return;
    this.end('closed', new QmpDisconnectedError(this.socketPath, 'the client closed the connection'));
    if (this.socket.destroyed) return;
    const gone = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    const timer = setTimeout(() => this.socket.destroy(), HANG_UP_GRACE_MS);
    this.socket.end();
    await gone;
    clearTimeout(timer);
  }

  private send(command: string, args: object | undefined, timeoutMs: number): Promise<unknown> {
    const id = `vhdvault-${this.nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTimeoutError(this.socketPath, `${command}: no reply within ${seconds(timeoutMs)} (QEMU may still carry it out)`));
      }, timeoutMs);
      this.pending.set(id, { command, args, resolve, reject, timer });
      this.socket.write(encodeCommand(command, args, id));
    });
  }

  private receive(chunk: Buffer): void {
    // An NBD server greets with its magic and no newline: said at once, rather than as a missing greeting later.
    if (!this.greeting && !this.heard && chunk.subarray(0, 8).toString('latin1') === 'NBDMAGIC') {
      return this.die(new QmpProtocolError(this.socketPath, 'is an NBD server, not a QMP monitor (give the socket of QEMU\'s -qmp unix:<path>,server=on, or of qemu-storage-daemon\'s --chardev socket … --monitor)'));
    }
    this.heard = true;
    try {
      for (const line of this.lines.push(chunk)) {
        if (this.state === 'closed' || this.state === 'dead') return;
        if (line.trim() !== '') this.route(parseLine(line), line);
      }
    } catch (err) {
      if (!(err instanceof Malformed)) throw err;
      this.die(new QmpProtocolError(this.socketPath, err.message));
    }
  }

  private route(message: Record<string, unknown>, line: string): void {
    if (!this.greeting) {
      if (!isGreeting(message)) throw new Malformed(`expected the QMP greeting, got ${preview(line)}`);
      this.greeting = message.QMP;
      return this.onGreeting?.(message.QMP);
    }
    const event = parseEvent(message);
    if (event) return this.events.emit(event);
    if (!isReturn(message) && !isErrorReply(message)) throw new Malformed(`not a reply or an event: ${preview(line)}`);
    // QEMU answers without an id only when it could not parse what we sent: nothing to route it to.
    if (message.id === undefined) throw new Malformed(`a reply without an id: ${preview(line)}`);
    const call = typeof message.id === 'string' ? this.pending.get(message.id) : undefined;
    if (!call) return; // the call timed out: its late reply goes nowhere
    this.pending.delete(message.id as string);
    clearTimeout(call.timer);
    if (isErrorReply(message)) call.reject(new QmpCommandError(this.socketPath, call.command, call.args, message.error.class, message.error.desc));
    else call.resolve(message.return);
  }

  /** The greeting, once QEMU sends it; fails when the connection does, or after timeoutMs. */
  private greeted(): Promise<QmpGreeting['QMP']> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const hint = "QEMU's monitor serves one client at a time: is another one connected?";
        reject(new QmpTimeoutError(this.socketPath, `no QMP greeting within ${seconds(this.timeoutMs)} (${hint})`));
      }, this.timeoutMs);
      const onClose = () => {
        clearTimeout(timer);
        reject(this.cause);
      };
      this.onGreeting = (greeting) => {
        clearTimeout(timer);
        this.socket.off('close', onClose);
        resolve(greeting);
      };
      this.socket.once('close', onClose);
    });
  }

  private connectionError(err: NodeJS.ErrnoException): QmpError {
    const hint = '(is QEMU running?)';
    if (err.code === 'ENOENT') return new QmpError(this.socketPath, `no such socket ${hint}`);
    if (err.code === 'ECONNREFUSED') return new QmpError(this.socketPath, `connection refused ${hint}`);
    if (err.code === 'EACCES' || err.code === 'EPERM') return new QmpError(this.socketPath, 'permission denied');
    // A QEMU that died with our command unread resets the connection rather than closing it.
    if (err.code === 'ECONNRESET' || err.code === 'EPIPE') return hungUp(this.socketPath);
    if (this.state === 'connecting' && !this.greeting) return new QmpError(this.socketPath, `cannot connect: ${err.message}`);
    return new QmpDisconnectedError(this.socketPath, `the connection failed: ${err.message}`);
  }

  /** The connection is broken or gone: fail everything pending with `cause`, once. */
  private die(cause: QmpError): void {
    if (this.state === 'closed' || this.state === 'dead') return;
    this.end('dead', cause);
    this.socket.destroy();
  }

  private end(state: 'closed' | 'dead', cause: QmpError): void {
    this.state = state;
    this.cause = cause;
    for (const [id, call] of this.pending) {
      this.pending.delete(id);
      clearTimeout(call.timer);
      call.reject(interrupted(cause, call.command));
    }
    this.events.end(cause);
  }
}

const hungUp = (socket: string) => new QmpDisconnectedError(socket, 'QEMU closed the connection (did it exit?)');

/** The error a call gets when the connection ends under it: the same kind, naming the command. */
function interrupted(cause: QmpError, command: string): QmpError {
  const problem = `${command}: no reply: ${cause.problem}`;
  return cause instanceof QmpProtocolError ? new QmpProtocolError(cause.socket, problem) : new QmpDisconnectedError(cause.socket, problem);
}
