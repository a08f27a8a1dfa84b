/**
 * Hostile and broken clients against `vhdvault serve`: every malformed
 * handshake or request gets the protocol's error reply or a closed
 * connection, never a crash, and the server's memory stays bounded; a real
 * client still works afterwards.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Command, Errno, Option, OptionReply } from '../src/nbd/constants.js';
import { encodeGo, encodeMetaContext, encodeOption } from '../src/nbd/handshake.js';
import { encodeRequest } from '../src/nbd/transmission.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { type Serving, startServe } from './helpers/serve.js';
import { backupOf, initRepo } from './helpers/store.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const dir = await tempDir();
let serving: Serving;
let socketPath: string;

/** A raw connection: bytes out, bytes in, and whether the server hung up. */
class RawClient {
  private data = Buffer.alloc(0);
  closed = false;
  private waiters: Array<() => void> = [];

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.data = Buffer.concat([this.data, d]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  static async open(): Promise<RawClient> {
    const socket = connect(socketPath);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawClient(socket);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(...parts: Buffer[]): void {
    this.socket.write(Buffer.concat(parts));
  }

  /**
   * Wait for `n` bytes (or the close); returns them, or null when the server closed first.
   * The limit guards against a hang only: 5 s once ran out in CI under a loaded machine.
   */
  async take(n: number, timeoutMs = 30_000): Promise<Buffer | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.data.length < n && !this.closed) {
      if (Date.now() > deadline) throw new Error(`no reply within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    if (this.data.length < n) return null;
    const out = this.data.subarray(0, n);
    this.data = this.data.subarray(n);
    return out;
  }

  /** Resolves once the server has closed the connection. */
  async closedByServer(timeoutMs = 30_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  /** Greeting read, client flags sent (fixed newstyle, no zeroes). */
  async greet(flags = 3): Promise<void> {
    expect((await this.take(18))!.subarray(0, 8).toString()).toBe('NBDMAGIC');
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags, 0);
    this.send(b);
  }

  /** One option reply: its type and payload. */
  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.take(20);
    if (!h) throw new Error('server closed instead of replying');
    const data = (await this.take(h.readUInt32BE(16)))!;
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Option replies up to and including the final ACK or error. */
  async replies(): Promise<Array<{ type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.reply();
      out.push(r);
      if (r.type === OptionReply.ACK || r.type >= 2 ** 31) return out;
    }
  }

  /** Handshake to transmission on the default export, with structured replies and base:allocation when asked. */
  async go(options: { structured?: boolean; context?: boolean } = {}): Promise<void> {
    await this.greet();
    if (options.structured) {
      this.send(encodeOption(Option.STRUCTURED_REPLY));
      expect((await this.replies()).at(-1)!.type).toBe(OptionReply.ACK);
    }
    if (options.context) {
      this.send(encodeOption(Option.SET_META_CONTEXT, encodeMetaContext({ name: '', queries: ['base:allocation'] })));
      expect((await this.replies()).at(-1)!.type).toBe(OptionReply.ACK);
    }
    this.send(encodeOption(Option.GO, encodeGo({ name: '', infos: [] })));
    expect((await this.replies()).at(-1)!.type).toBe(OptionReply.ACK);
  }

  /** A simple reply's error, or a structured reply's (0 for success); skips a successful read's payload. */
  async commandError(readLength = 0): Promise<number> {
    const magic = (await this.take(4))!.readUInt32BE(0);
    if (magic === 0x67446698) {
      const rest = (await this.take(12))!;
      const error = rest.readUInt32BE(0);
      if (error === 0 && readLength) await this.take(readLength);
      return error;
    }
    expect(magic).toBe(0x668e33ef);
    for (;;) {
      const h = (await this.take(16))!;
      const type = h.readUInt16BE(2);
      const payload = (await this.take(h.readUInt32BE(12)))!;
      if (type >= 0x8000) return payload.readUInt32BE(0);
      if (h.readUInt16BE(0) & 1) return 0;
      const next = (await this.take(4))!.readUInt32BE(0);
      expect(next).toBe(0x668e33ef);
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

const request = (type: number, offset: number, length: number, cookie = 1n, flags = 0) => encodeRequest({ type, offset, length, cookie, flags });

function serverRss(): number {
  const status = readFileSync(`/proc/${serving.child.pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]) * 1024;
}

beforeAll(async () => {
  const repo = join(dir, 'repo');
  await initRepo(repo, 'dir');
  const disk = join(dir, 'disk.raw');
  await makeRaw(disk, SIZE, [[0, 4 * MiB]]);
  await backupOf(repo, 'vm', disk);
  socketPath = join(dir, 'hostile.sock');
  serving = await startServe(repo, 'vm', '--socket', socketPath);
});

afterAll(async () => {
  // A real client still gets the whole disk from the server the fuzzing hit.
  const out = join(dir, 'after.raw');
  await run('nbdcopy', [serving.uri, out]);
  expect(await serving.stop()).toBe(0);
});

describe('hostile handshakes', () => {
  it('unknown client flags or a bad option magic close the connection', async () => {
    const a = await RawClient.open();
    await a.greet(0xff);
    expect(await a.closedByServer()).toBe(true);
    const b = await RawClient.open();
    await b.greet();
    const bad = encodeOption(Option.LIST);
    bad.write('XXXXXXXX', 0);
    b.send(bad);
    expect(await b.closedByServer()).toBe(true);
  });

  it('an option claiming 4 GiB of data closes the connection without allocating it', async () => {
    const before = serverRss();
    const c = await RawClient.open();
    await c.greet();
    const header = encodeOption(Option.GO);
    header.writeUInt32BE(0xffffffff, 12);
    c.send(header, Buffer.alloc(64 * 1024));
    expect(await c.closedByServer()).toBe(true);
    expect(serverRss() - before).toBeLessThan(64 * MiB);
  });

  it('malformed option payloads get NBD_REP_ERR_INVALID and the handshake goes on', async () => {
    const c = await RawClient.open();
    await c.greet();
    const cases: Buffer[] = [
      encodeOption(Option.LIST, Buffer.from('junk')),
      encodeOption(Option.GO, Buffer.from([0, 0, 0, 200, 1, 2])), // name runs past the payload
      encodeOption(Option.GO, encodeGo({ name: 'x'.repeat(5000), infos: [] })),
      encodeOption(Option.GO, Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from('a\0b'), Buffer.from([0, 0])])),
      encodeOption(Option.STRUCTURED_REPLY, Buffer.from('x')),
    ];
    for (const option of cases) {
      c.send(option);
      expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_INVALID);
    }
    c.send(encodeOption(Option.SET_META_CONTEXT, encodeMetaContext({ name: '', queries: ['base:allocation'] })));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_INVALID); // before structured replies
    c.send(encodeOption(Option.STRUCTURED_REPLY));
    await c.replies();
    c.send(encodeOption(Option.SET_META_CONTEXT, encodeMetaContext({ name: '', queries: Array.from({ length: 100 }, () => 'base:allocation') })));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_INVALID);
    c.send(encodeOption(99));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_UNSUP);
    c.send(encodeOption(Option.STARTTLS));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_UNSUP);
    c.send(encodeOption(Option.GO, encodeGo({ name: 'no-such-export', infos: [] })));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_UNKNOWN);
    c.send(encodeOption(Option.GO, encodeGo({ name: 'vm@20200101T000000000Z-abcdef', infos: [] })));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ERR_UNKNOWN);
    c.send(encodeOption(Option.ABORT));
    expect((await c.replies()).at(-1)!.type).toBe(OptionReply.ACK);
    expect(await c.closedByServer()).toBe(true);
  });

  it('a client that never chooses an export is cut off after a bounded number of options', async () => {
    const c = await RawClient.open();
    await c.greet();
    for (let i = 0; i < 200 && !c.closed; i++) c.send(encodeOption(99));
    expect(await c.closedByServer()).toBe(true);
  });

  it('an unknown export named by the old EXPORT_NAME option ends the connection', async () => {
    const c = await RawClient.open();
    await c.greet();
    c.send(encodeOption(Option.EXPORT_NAME, Buffer.from('nope')));
    expect(await c.closedByServer()).toBe(true);
  });
});

describe('hostile requests', () => {
  it('requests out of range, unknown or not allowed get errors and the session goes on', async () => {
    for (const structured of [false, true]) {
      const c = await RawClient.open();
      await c.go({ structured });
      c.send(request(Command.READ, SIZE - 512, 1024));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.READ, 2 ** 53, 512));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.READ, 0, 64 * MiB));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.READ, 0, 0));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.WRITE, 0, 4096), Buffer.alloc(4096, 1));
      expect(await c.commandError()).toBe(Errno.EPERM); // the payload was drained: the next request parses
      c.send(request(42, 0, 512));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.READ, 0, 512, 7n, 0x8000));
      expect(await c.commandError()).toBe(Errno.EINVAL);
      c.send(request(Command.BLOCK_STATUS, 0, 4096));
      expect(await c.commandError()).toBe(Errno.EINVAL); // no meta context selected
      c.send(request(Command.READ, 0, 4096));
      expect(await c.commandError(4096)).toBe(0);
      c.close();
    }
  });

  it('a request with a bad magic, or a write too large to drain, closes the connection', async () => {
    const a = await RawClient.open();
    await a.go();
    const bad = request(Command.READ, 0, 512);
    bad.writeUInt32BE(0xdeadbeef, 0);
    a.send(bad);
    expect(await a.closedByServer()).toBe(true);
    const b = await RawClient.open();
    await b.go();
    b.send(request(Command.WRITE, 0, 0xfffffff0));
    expect(await b.closedByServer()).toBe(true);
  });

  it('a client that sends reads and never reads the replies costs bounded memory', async () => {
    const c = await RawClient.open();
    await c.go();
    c.socket.pause();
    const before = serverRss();
    // 4 GiB of replies asked for.
    for (let i = 0; i < 4096; i++) c.send(request(Command.READ, (i % 8) * MiB, MiB, BigInt(i)));
    await new Promise((r) => setTimeout(r, 1500));
    expect(serverRss() - before).toBeLessThan(200 * MiB);
    c.close();
  });

  it('random bytes after the greeting or after GO never crash the server', async () => {
    let seed = 12345;
    const random = (n: number) => Buffer.from(Array.from({ length: n }, () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff));
    for (let i = 0; i < 40; i++) {
      const c = await RawClient.open();
      if (i % 2 === 0) await c.greet();
      else await c.go({ structured: i % 4 === 1 });
      const junk = random(16 + (i * 37) % 512);
      // Half the cases look like a request (right magic) with random fields.
      if (i % 3 === 0) junk.writeUInt32BE(i % 2 === 0 ? 0x49484156 : 0x25609513, 0);
      c.send(junk);
      await new Promise((r) => setTimeout(r, 20));
      c.close();
    }
    expect(serving.child.exitCode).toBeNull();
  });
});
