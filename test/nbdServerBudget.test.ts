/**
 * The server's bounds, in process against an export that counts its reads:
 * bytes of replies in progress per connection and per server, nothing started
 * for a client that left, separate limits for negotiating and established
 * connections, each refusal logged.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { OptionReply } from '../src/nbd/constants.js';
import type { ExportCatalog, NbdExport, ReadPiece } from '../src/nbd/export.js';
import { NbdServer, type ServerOptions } from '../src/nbd/NbdServer.js';
import { tempDir } from './helpers/files.js';
import { RawConnection } from './helpers/nbdRaw.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const dir = await tempDir();

/** Byte `i` of the export: its 512-byte sector's number, mod 256. */
function pattern(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let at = 0; at < length; at += 512) b.fill(((offset + at) >> 9) & 0xff, at, Math.min(at + 512, length));
  return b;
}

/** A read-only export whose reads are counted, and held until `open()` when `gated`. */
class CountingExport implements NbdExport {
  readonly size = SIZE;
  readonly writable = false;
  reads = 0;
  private gate: Promise<void> | null = null;
  private openGate: () => void = () => {};
  private readListeners: Array<() => void> = [];

  constructor(gated: boolean) {
    if (gated) this.gate = new Promise((resolve) => (this.openGate = resolve));
  }

  open(): void {
    this.openGate();
  }

  /** Resolves once `n` reads have started. */
  async started(n: number): Promise<void> {
    while (this.reads < n) await new Promise<void>((resolve) => this.readListeners.push(resolve));
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    this.reads++;
    for (const l of this.readListeners.splice(0)) l();
    await this.gate;
    return [{ offset, data: pattern(offset, length) }];
  }

  async allocation(_offset: number, length: number) {
    return [{ length, flags: 0 }];
  }
}

const servers: NbdServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

let serial = 0;
async function start(exp: NbdExport, options: ServerOptions = {}): Promise<{ path: string; log: string[] }> {
  const catalog: ExportCatalog = { list: async () => [{ name: '', description: '' }], open: async () => exp, close: async () => {} };
  const log: string[] = [];
  const server = new NbdServer(catalog, { ...options, log: (m) => log.push(m) });
  const path = join(dir, `s${serial++}.sock`);
  await server.listen({ path });
  servers.push(server);
  return { path, log };
}

async function established(path: string): Promise<RawConnection> {
  const c = await RawConnection.open(path);
  await c.greet();
  expect((await c.go()).type).toBe(OptionReply.ACK);
  return c;
}

/** Resolves once a line matching `re` is logged; fails the test after 10 s. */
async function logged(log: string[], re: RegExp): Promise<string> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const line = log.find((l) => re.test(l));
    if (line) return line;
    if (Date.now() > deadline) throw new Error(`nothing logged like ${re}; logged: ${log.join(' | ')}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('reply budgets', () => {
  it('a READ larger than the connection budget is served alone, and a normal client gets every byte right', async () => {
    const { path } = await start(new CountingExport(false), { connectionBudget: 4 * MiB, serverBudget: 8 * MiB });
    const c = await established(path);
    const reads: Array<[number, number]> = [[0, 32 * MiB], [32 * MiB, 32 * MiB], [5 * MiB + 512, 3 * MiB], [0, 512]];
    c.sendReads(reads);
    for (const [offset, length] of reads) {
      const reply = await c.readReply(length);
      expect(reply.error).toBe(0);
      expect(reply.data!.equals(pattern(offset, length))).toBe(true);
    }
    c.socket.destroy();
  });

  it('a client that never reads holds at most its connection budget; all of them at most the server budget', async () => {
    const exp = new CountingExport(false);
    const { path } = await start(exp, { connectionBudget: 8 * MiB, serverBudget: 16 * MiB });
    const clients = [await established(path), await established(path), await established(path)];
    // Each asks for 4 replies of 6 MiB and reads none: a Unix socket's buffer takes a fraction of one.
    for (const c of clients) {
      c.socket.pause();
      c.sendReads([[0, 6 * MiB], [8 * MiB, 6 * MiB], [16 * MiB, 6 * MiB], [24 * MiB, 6 * MiB]]);
    }
    await exp.started(2);
    // What the server would start next, it starts within this (nothing is waiting on the disk).
    await new Promise((r) => setTimeout(r, 300));
    expect(exp.reads).toBe(2);
    // One leaves: its budget goes to the client that waited, and nothing more of its own starts.
    clients[0]!.socket.destroy();
    await exp.started(3);
    await new Promise((r) => setTimeout(r, 300));
    expect(exp.reads).toBe(3);
    for (const c of clients) c.socket.destroy();
  });

  it('requests a client left behind are dropped when it disconnects, not read from the export', async () => {
    const exp = new CountingExport(true);
    const { path, log } = await start(exp, { connectionBudget: 4 * MiB });
    const c = await established(path);
    c.sendReads(Array.from({ length: 10 }, (_, i): [number, number] => [i * 4 * MiB, 4 * MiB]));
    await exp.started(1);
    c.socket.destroy();
    expect(await logged(log, /disconnected with 1 requests unanswered/)).toContain('client on the Unix socket');
    exp.open();
    await servers.pop()!.stop();
    expect(exp.reads).toBe(1);
  });
});

describe('a client that stops reading its replies', () => {
  it('is disconnected once its waiting replies have not moved for the stall time, and what it held goes to the others', async () => {
    const exp = new CountingExport(false);
    const { path, log } = await start(exp, { connectionBudget: 8 * MiB, serverBudget: 8 * MiB, replyStall: 400 });
    const hog = await established(path);
    hog.socket.pause();
    hog.sendReads([[0, 8 * MiB], [8 * MiB, 8 * MiB]]); // the first fills the server's budget, unread
    await exp.started(1);
    const reader = await established(path);
    reader.sendReads([[16 * MiB, MiB]]);
    expect(await logged(log, /took none of its replies for [\d.]+ s with \d+ bytes of them waiting: disconnected/)).toContain('client on the Unix socket');
    // (The hog, paused, reads nothing: not even that it was hung up on.)
    const reply = await reader.readReply(MiB);
    expect(reply.data!.equals(pattern(16 * MiB, MiB))).toBe(true);
    expect(exp.reads).toBe(2); // the hog's second READ was dropped unstarted
    reader.socket.destroy();
    hog.socket.destroy();
  });

  it('is left alone while it takes each reply within the stall time, however slowly', async () => {
    const exp = new CountingExport(false);
    const { path, log } = await start(exp, { replyStall: 1000 });
    const slow = await established(path);
    slow.socket.pause();
    slow.sendReads(Array.from({ length: 16 }, (_, i): [number, number] => [i * 256 * 1024, 256 * 1024]));
    await exp.started(1);
    // A reader that takes a little of its replies now and then, over several stall times.
    const deadline = Date.now() + 3000;
    while (Date.now() < deadline) {
      slow.socket.resume();
      await new Promise((r) => setTimeout(r, 5));
      slow.socket.pause();
      await new Promise((r) => setTimeout(r, 150));
    }
    expect(log.filter((l) => /took none of its replies/.test(l))).toEqual([]);
    slow.socket.destroy();
  });
});

describe('connection limits', () => {
  it('a client beyond --max-connections is refused at GO with the reason, logged, and gets in once one leaves', async () => {
    const { path, log } = await start(new CountingExport(false), { maxConnections: 2 });
    const first = await established(path);
    await established(path);
    const third = await RawConnection.open(path);
    await third.greet();
    const refused = await third.go();
    expect(refused.type).toBe(OptionReply.ERR_POLICY);
    expect(refused.message).toMatch(/2 connections already established \(at most 2: --max-connections\)/);
    expect(await logged(log, /^refused client on the Unix socket: 2 connections already established/)).toBeTruthy();
    first.socket.end(Buffer.from('25609513000000020000000000000000000000000000000000000000', 'hex')); // DISC
    await first.closedByServer();
    expect((await third.go()).type).toBe(OptionReply.ACK);
  });

  it('connections that never negotiate are closed after the handshake timeout; beyond the negotiating limit, at once', async () => {
    const { path, log } = await start(new CountingExport(false), { maxNegotiating: 2, handshakeTimeout: 200 });
    const idle = [await RawConnection.open(path), await RawConnection.open(path)];
    const extra = await RawConnection.open(path);
    await extra.closedByServer();
    expect(await extra.take(1)).toBeNull(); // not even a greeting
    expect(await logged(log, /^refused client on the Unix socket: 2 connections already negotiating \(at most 2, each closed if it has not chosen an export within 0\.2 s\)/)).toBeTruthy();
    for (const c of idle) await c.closedByServer();
    expect(log.filter((l) => /no export chosen within 0\.2 s; closing/.test(l))).toHaveLength(2);
    // Established connections do not count against the negotiating limit.
    await established(path);
    await established(path);
    await established(path);
  });
});
