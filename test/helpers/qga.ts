/**
 * A minimal QEMU guest agent client, for tests only (vhdvault's own will live
 * in src/): one connection to the host end of the agent's virtio-serial port,
 * line-delimited JSON. connect() flushes the agent's parser (a 0xFF byte, which
 * it discards as invalid input) and sends `guest-sync` with a random id,
 * skipping every line until the reply with that id: what an earlier client
 * left unread in the channel is never taken for an answer. Then execute() sends
 * one command at a time and returns its `return` (or throws its `error`).
 */
import { randomInt } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';

export class QgaError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`guest agent: ${command} failed: ${errorClass}: ${desc}`);
  }
}

type Reply = { return: unknown } | { error: { class: string; desc: string } };

export class QgaClient {
  private buffered = '';
  private waiter: ((line: string | Error) => void) | null = null;
  private readonly lines: string[] = [];
  private failure: Error | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly socketPath: string,
    private readonly socket: Socket,
  ) {
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => {
      this.buffered += chunk;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        // A 0xFF sentinel (guest-sync-delimited) or stray bytes before the JSON are not part of it.
        const line = this.buffered.slice(0, nl).replace(/^[^{]*/, '');
        this.buffered = this.buffered.slice(nl + 1);
        if (line.trim() === '') continue;
        if (this.waiter) {
          const w = this.waiter;
          this.waiter = null;
          w(line);
        } else this.lines.push(line);
      }
    });
    const fail = (err: Error) => {
      this.failure ??= err;
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = null;
        w(this.failure);
      }
    };
    socket.on('error', (err) => fail(new Error(`guest agent socket ${socketPath}: ${err.message}`)));
    socket.on('close', () => fail(new Error(`guest agent socket ${socketPath} closed`)));
  }

  /** Connects and synchronizes; `timeoutMs` bounds the synchronization. */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<QgaClient> {
    const socket = createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new QgaClient(socketPath, socket);
    try {
      await client.sync(timeoutMs);
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  private nextLine(deadline: number, what: string): Promise<string> {
    const line = this.lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.waiter = null;
          reject(new Error(`guest agent (${this.socketPath}): no reply to ${what} in time`));
        },
        Math.max(0, deadline - Date.now()),
      );
      this.waiter = (l) => {
        clearTimeout(timer);
        if (l instanceof Error) reject(l);
        else resolve(l);
      };
    });
  }

  private async sync(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.socket.write(Buffer.from([0xff]));
    this.socket.write(`${JSON.stringify({ execute: 'guest-sync', arguments: { id } })}\n`);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = await this.nextLine(deadline, 'guest-sync');
      try {
        if ((JSON.parse(line) as { return?: unknown }).return === id) return;
      } catch {
        // not JSON: left over from before the sync
      }
    }
  }

  /** Runs `command` (after any earlier call) and returns its `return`. */
  execute<T = unknown>(command: string, args?: object, timeoutMs = 30_000): Promise<T> {
    const call = this.queue.then(async () => {
      this.socket.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
      const line = await this.nextLine(Date.now() + timeoutMs, command);
      const reply = JSON.parse(line) as Reply;
      if ('error' in reply) throw new QgaError(command, reply.error.class, reply.error.desc);
      return reply.return as T;
    });
    this.queue = call.catch(() => undefined);
    return call;
  }

  async close(): Promise<void> {
    if (this.socket.destroyed) return;
    const closed = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), 1000);
    await closed;
    clearTimeout(timer);
  }
}
