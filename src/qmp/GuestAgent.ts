import { createConnection, type Socket } from 'node:net';
import { randomInt } from 'node:crypto';
import { LineSplitter, Malformed } from './qmpWire.js';
import { QmpCommandError, QmpDisconnectedError, QmpError, QmpProtocolError, QmpTimeoutError } from './errors.js';

/** How long one agent command may take: a guest that does not answer is a guest without a working agent. */
export const DEFAULT_AGENT_TIMEOUT_MS = 10_000;
/** The agent's lines are short: a status, a count. */
const MAX_AGENT_LINE = 1024 * 1024;

/**
 * A QEMU guest agent (qemu-ga) on its host-side socket: the chardev of the
 * guest's `org.qemu.guest_agent.0` port, or libvirt's channel socket.
 *
 * The same JSON lines as QMP, but no greeting and one command at a time; the
 * socket is a pipe into the guest that may still hold the answer to a command
 * a killed client sent. So every connection starts with `guest-sync` and a
 * random number, and lines are skipped until that number comes back.
 */
export class GuestAgent {
  private readonly lines = new LineSplitter(MAX_AGENT_LINE);
  private waiting: { resolve(line: Record<string, unknown>): void; reject(err: Error): void } | null = null;
  private queue: Record<string, unknown>[] = [];
  private failure: QmpError | null = null;

  private constructor(
    readonly socketPath: string,
    private readonly socket: Socket,
    private readonly timeoutMs: number,
  ) {
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) => this.fail(new QmpDisconnectedError(socketPath, `guest agent socket: ${err.code ?? err.message}`)));
    socket.on('close', () => this.fail(new QmpDisconnectedError(socketPath, 'the guest agent socket closed')));
  }

  /** Connect and synchronise; fails within `timeoutMs` when no agent answers inside the guest. */
  static async connect(socketPath: string, options: { timeoutMs?: number } = {}): Promise<GuestAgent> {
    const socket = createConnection({ path: socketPath });
    const agent = new GuestAgent(socketPath, socket, options.timeoutMs ?? DEFAULT_AGENT_TIMEOUT_MS);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      await agent.sync();
      return agent;
    } catch (err) {
      agent.close();
      if (err instanceof QmpError) throw err;
      const code = (err as NodeJS.ErrnoException).code;
      throw new QmpDisconnectedError(socketPath, code === 'ENOENT' ? 'no such socket (is the guest agent channel configured?)' : `cannot connect: ${code ?? (err as Error).message}`);
    }
  }

  /** Run `command`; resolves to its `return` value. */
  async execute<T = unknown>(command: string, args?: object): Promise<T> {
    this.socket.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
    const reply = await this.next(command);
    if ('error' in reply) {
      const e = reply.error as { class?: string; desc?: string };
      throw new QmpCommandError(this.socketPath, command, args, e.class ?? 'GenericError', e.desc ?? 'failed');
    }
    if (!('return' in reply)) throw new QmpProtocolError(this.socketPath, `${command}: a reply with neither return nor error`);
    return reply.return as T;
  }

  close(): void {
    this.fail(new QmpDisconnectedError(this.socketPath, 'the client closed the connection'));
    this.socket.destroy();
  }

  private async sync(): Promise<void> {
    const token = randomInt(1, 2 ** 31);
    this.socket.write(`${JSON.stringify({ execute: 'guest-sync', arguments: { id: token } })}\n`);
    // Answers to commands a killed client sent may come first.
    for (;;) {
      const reply = await this.next('guest-sync');
      if (reply.return === token) return;
    }
  }

  private next(command: string): Promise<Record<string, unknown>> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting = null;
        reject(new QmpTimeoutError(this.socketPath, `${command}: the guest agent did not answer within ${this.timeoutMs / 1000} s (is qemu-ga running in the guest?)`));
      }, this.timeoutMs);
      this.waiting = {
        resolve: (line) => (clearTimeout(timer), resolve(line)),
        reject: (err) => (clearTimeout(timer), reject(err)),
      };
    });
  }

  private receive(chunk: Buffer): void {
    try {
      for (const line of this.lines.push(chunk)) {
        // guest-sync-delimited's 0xFF marker, and blank lines, carry nothing.
        const text = line.replace(/^\xff+/, '').trim();
        if (text === '') continue;
        let message: unknown;
        try {
          message = JSON.parse(text);
        } catch {
          throw new Malformed('a line that is not JSON');
        }
        if (message === null || typeof message !== 'object' || Array.isArray(message)) throw new Malformed('a line that is not a JSON object');
        this.deliver(message as Record<string, unknown>);
      }
    } catch (err) {
      this.fail(new QmpProtocolError(this.socketPath, `the guest agent sent ${(err as Error).message}`));
      this.socket.destroy();
    }
  }

  private deliver(message: Record<string, unknown>): void {
    const w = this.waiting;
    this.waiting = null;
    if (w) w.resolve(message);
    else if (this.queue.length < 16) this.queue.push(message);
  }

  private fail(err: QmpError): void {
    this.failure ??= err;
    const w = this.waiting;
    this.waiting = null;
    w?.reject(this.failure);
  }
}
