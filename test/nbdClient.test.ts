/**
 * The NBD client and `vhdvault backup --source nbd…`: against qemu-nbd (dirty
 * bitmaps), nbdkit (memory and data plugins), and fake servers written here
 * that break the protocol in one way each.
 */
import { execFileSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectRefused, vhdvaultAsync } from './helpers/cli.js';
import { sameBytes, tempDir } from './helpers/files.js';
import { hasNbdkit, hasQemuNbd, nbdkit, qemuNbd, stopServers, unixUri, vhdvaultMeasured } from './helpers/nbdTools.js';
import { initRepo, listed } from './helpers/store.js';
import { Chunk, HandshakeFlag, Option, OptionReply, TransmissionFlag } from '../src/nbd/constants.js';
import { FrameReader } from '../src/nbd/FrameReader.js';
import { encodeExportNameReply, encodeGreeting, encodeInfoExport, encodeMetaContextReply, encodeOptionReply, OPTION_HEADER_SIZE, parseMetaContext, parseOptionHeader } from '../src/nbd/handshake.js';
import { NbdClient } from '../src/nbd/NbdClient.js';
import { encodeBlockStatusChunk, encodeChunkHeader, encodeDataChunk, encodeHoleChunk, encodeNoneChunk, encodeSimpleReply, parseRequest, REQUEST_SIZE, type Request } from '../src/nbd/transmission.js';
import { parseNbdUri } from '../src/nbd/uri.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;

const dir = await tempDir('vhdvault-nbd-');
afterAll(stopServers);

let sockets = 0;
const newSocket = () => join(dir, `s${++sockets}.sock`);

function run(cmd: string, ...args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** Bytes of [from, to) that qemu-img map says hold data (allocated and not known zero): what base:allocation lets us read. */
function dataBytes(map: MapEntry[], from = 0, to = Infinity): number {
  let n = 0;
  for (const e of map) if (e.data && !e.zero) n += Math.max(0, Math.min(to, e.start + e.length) - Math.max(from, e.start));
  return n;
}

const qemuMap = (image: string): MapEntry[] => JSON.parse(run('qemu-img', 'map', '--output=json', '-f', 'qcow2', image));
const qemuIo = (image: string, ...commands: string[]) => run('qemu-io', '-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image);

async function backupJson(...args: string[]) {
  const r = await vhdvaultAsync('backup', ...args, '--json');
  expect(r.stderr, r.stderr).toBe('');
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout);
}

describe('NBD URIs', () => {
  it('reads TCP, IPv6 and Unix forms, percent-decoding the export name', () => {
    expect(parseNbdUri('nbd://example.org/disk%201')).toMatchObject({ endpoint: { transport: 'tcp', host: 'example.org', port: 10809 }, exportName: 'disk 1', bitmap: null });
    expect(parseNbdUri('nbd://[::1]:10810/a/../b')).toMatchObject({ endpoint: { host: '::1', port: 10810 }, exportName: 'a/../b' });
    expect(parseNbdUri('nbd://h:1//x')).toMatchObject({ exportName: '/x' });
    expect(parseNbdUri('nbd://h')).toMatchObject({ exportName: '' });
    expect(parseNbdUri('nbd+unix:///vm?socket=/run/a+b.sock&bitmap=b%2B0')).toMatchObject({ endpoint: { transport: 'unix', socket: '/run/a+b.sock' }, exportName: 'vm', bitmap: 'b+0' });
  });

  it.each([
    ['nbd:/x', /not an NBD URI/],
    ['nbds://h/x', /TLS .* not supported/],
    ['nbd+vsock://1/x', /transport "nbd\+vsock" is not supported/],
    ['nbd://::1/x', /IPv6 address goes in brackets/],
    ['nbd://h:0/x', /port 0 is not from 1 to 65535/],
    ['nbd://h:99999/x', /port 99999/],
    ['nbd:///x', /no host/],
    ['nbd://u@h/x', /user names are not supported/],
    ['nbd://h/%zz', /bad percent-encoding/],
    ['nbd://h/x%00', /NUL/],
    ['nbd://h/x?socket=/s', /a socket needs nbd\+unix/],
    ['nbd://h/x?bitmap=a&bitmap=b', /given twice/],
    ['nbd://h/x?bitmap=', /names no bitmap/],
    ['nbd://h/x?tls-certificates=/x', /TLS is not supported/],
    ['nbd+unix:///x', /needs \?socket=<path>/],
    ['nbd+unix://h/x?socket=/s', /has no host/],
    ['nbd://h/x#f', /no #fragment/],
  ])('refuses %s in one line', (uri, problem) => {
    expect(() => parseNbdUri(uri)).toThrow(problem);
    try {
      parseNbdUri(uri);
    } catch (err) {
      expect((err as Error).message.startsWith(`${uri}: `)).toBe(true);
      expect((err as Error).message).not.toContain('\n');
    }
  });
});

describe.skipIf(!hasQemuNbd)('backup from qemu-nbd', () => {
  const image = join(dir, 'd.qcow2');
  const repo = join(dir, 'repo-qemu');
  let fullId = '';

  it('a full backup reads only the allocated areas', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', image, '32M');
    // Blocks 0, 1-2, 4, 10 and 15 hold data; the others were never written.
    qemuIo(image, 'write -P 0x11 0 1M', 'write -P 0x22 3M 3M', 'write -P 0x33 9M 64k', 'write -P 0x44 20M 2M', 'write -P 0x55 30M 512k');
    const allocated = dataBytes(qemuMap(image));
    await initRepo(repo, 'dir');
    const server = await qemuNbd(newSocket(), ['-r', '-f', 'qcow2', image]);
    try {
      const r = await backupJson(repo, 'vm', '--source', unixUri(server.socket));
      expect(r).toMatchObject({ kind: 'full', bitmap: null, bytesRead: allocated, blocksRead: 16 });
      expect(r.extents).toBeGreaterThanOrEqual(5);
      fullId = r.id;
    } finally {
      await server.stop();
    }
  });

  it('a delta from a dirty bitmap reads only the dirty blocks, and restores exactly', async () => {
    expect(fullId).not.toBe('');
    run('qemu-img', 'bitmap', '--add', image, 'b0');
    // 64 KiB writes: two in block 2, one in block 6 (empty until now), one across blocks 3|4, one in block 15.
    qemuIo(image, 'write -P 0xab 5M 64k', 'write -P 0xac 5632k 64k', 'write -P 0xad 13M 64k', 'write -P 0xae 8160k 64k', 'write -P 0xaf 31M 64k');
    // A read-only export can carry only a disabled bitmap.
    run('qemu-img', 'bitmap', '--disable', image, 'b0');
    const dirty = [2, 3, 4, 6, 15];
    const map = qemuMap(image);
    // Whole dirty blocks, less what base:allocation says is a hole in them.
    const expected = dirty.reduce((sum, b) => sum + dataBytes(map, b * BLOCK, (b + 1) * BLOCK), 0);
    expect(expected).toBeLessThan(dirty.length * BLOCK);

    const server = await qemuNbd(newSocket(), ['-r', '-f', 'qcow2', '-B', 'b0', image]);
    try {
      const r = await backupJson(repo, 'vm', '--source', unixUri(server.socket, '&bitmap=b0'));
      expect(r).toMatchObject({ kind: 'delta', parent: fullId, bitmap: 'b0', blocksRead: dirty.length, bytesRead: expected, blocksWritten: dirty.length });
      expect(r.note).toBeUndefined();

      // The --bitmap form, equal to the URI's, is the same request.
      const same = await backupJson(repo, 'vm', '--source', unixUri(server.socket, '&bitmap=b0'), '--bitmap', 'b0');
      expect(same).toMatchObject({ kind: 'delta', bitmap: 'b0', bytesRead: expected, blocksWritten: 0 });
    } finally {
      await server.stop();
    }
    const reference = join(dir, 'qemu-ref.raw');
    const restored = join(dir, 'qemu-restored.raw');
    run('qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', image, reference);
    const r = await vhdvaultAsync('restore', repo, 'vm', restored);
    expect(r.code, r.stderr).toBe(0);
    expect(await sameBytes(restored, reference)).toBe(true);
  });

  it('a bitmap the server does not have is refused by name, and no backup is added', async () => {
    const before = (await listed(repo)).length;
    const server = await qemuNbd(newSocket(), ['-r', '-f', 'qcow2', '-B', 'b0', image]);
    try {
      const viaUri = await vhdvaultAsync('backup', repo, 'vm', '--source', unixUri(server.socket, '&bitmap=nosuch'));
      expectRefused(viaUri, '"nosuch"', /no dirty bitmap "nosuch" for export ""/);
      const viaFlag = await vhdvaultAsync('backup', repo, 'vm', '--source', unixUri(server.socket), '--bitmap', 'nosuch');
      expectRefused(viaFlag, '"nosuch"', /no dirty bitmap "nosuch" for export ""/);
      // With no backup to build on, the bitmap is still checked, then unused (and the report says why).
      const fresh = await backupJson(repo, 'other', '--source', unixUri(server.socket), '--bitmap', 'b0');
      expect(fresh).toMatchObject({ kind: 'full', bitmap: null, note: expect.stringMatching(/no previous backup .*"b0" not used/) });
    } finally {
      await server.stop();
    }
    expect((await listed(repo)).length).toBe(before + 1);
  });

  it('an export name the server does not have is refused by name', async () => {
    const server = await qemuNbd(newSocket(), ['-r', '-f', 'qcow2', '-x', 'disk0', image]);
    try {
      const named = await backupJson(repo, 'named', '--source', `nbd+unix:///disk0?socket=${server.socket}`);
      expect(named).toMatchObject({ kind: 'full', size: 32 * MiB });
      const r = await vhdvaultAsync('backup', repo, 'named', '--source', `nbd+unix:///nope?socket=${server.socket}`);
      expectRefused(r, server.socket, /the server has no export "nope" \(server: .*nope.*\)$/m);
    } finally {
      await server.stop();
    }
  });

  it('--bitmap is a usage error without an NBD source, or when the URI names another', async () => {
    const file = await vhdvaultAsync('backup', repo, 'vm', '--source', image, '--bitmap', 'b0');
    expect(file.code).toBe(2);
    expect(file.stderr).toMatch(/--bitmap needs an NBD source/);
    const both = await vhdvaultAsync('backup', repo, 'vm', '--source', unixUri(join(dir, 'none.sock'), '&bitmap=b0'), '--bitmap', 'b1');
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/--bitmap b1 and the source's bitmap=b0 differ/);
    const badUri = await vhdvaultAsync('backup', repo, 'vm', '--source', 'nbd+unix:///x');
    expect(badUri.code).toBe(2);
    expect(badUri.stderr.trim().split('\n')).toHaveLength(1);
  });
});

describe.skipIf(!hasNbdkit || !hasQemuNbd)('backup from nbdkit', () => {
  const repo = join(dir, 'repo-nbdkit');

  it('the memory plugin, written through qemu-io: backup and restore are exact', async () => {
    await initRepo(repo, 'vhd');
    const server = await nbdkit(newSocket(), ['memory', '12M']);
    try {
      const uri = unixUri(server.socket);
      run('qemu-io', '-f', 'raw', '-c', 'write -P 0x5a 1M 300k', '-c', 'write -P 0x17 6M 4k', '-c', 'write -P 0x99 12284k 4k', uri);
      const reference = join(dir, 'memory-ref.raw');
      run('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', uri, reference);
      const r = await backupJson(repo, 'mem', '--source', uri);
      expect(r).toMatchObject({ kind: 'full', blocksRead: 6, blocksWritten: 3 });
      // Only what was written travels (the plugin's allocation is page-grained).
      expect(r.bytesRead).toBeGreaterThanOrEqual(308 * 1024);
      expect(r.bytesRead).toBeLessThan(MiB);
      const restored = join(dir, 'memory-restored.raw');
      expect((await vhdvaultAsync('restore', repo, 'mem', restored)).code).toBe(0);
      expect(await sameBytes(restored, reference)).toBe(true);
    } finally {
      await server.stop();
    }
  });

  it('the data plugin: backup and restore give its bytes', async () => {
    const server = await nbdkit(newSocket(), ['data', '1 2 3 @1048576 ( 0x55 0xaa )*2048 @5242880 "vhdvault"', 'size=6M']);
    try {
      const expected = Buffer.alloc(6 * MiB);
      expected.set([1, 2, 3], 0);
      for (let i = 0; i < 4096; i += 2) expected.set([0x55, 0xaa], MiB + i);
      expected.write('vhdvault', 5 * MiB, 'latin1');
      const reference = join(dir, 'data-ref.raw');
      await writeFile(reference, expected);
      await backupJson(repo, 'data', '--source', unixUri(server.socket));
      const restored = join(dir, 'data-restored.raw');
      expect((await vhdvaultAsync('restore', repo, 'data', restored)).code).toBe(0);
      expect(await sameBytes(restored, reference)).toBe(true);
    } finally {
      await server.stop();
    }
  });

  it('an export that is not whole sectors is refused', async () => {
    const server = await nbdkit(newSocket(), ['data', '1', 'size=1000001']);
    try {
      const r = await vhdvaultAsync('backup', repo, 'odd', '--source', unixUri(server.socket));
      expectRefused(r, server.socket, /1000001 bytes, not a whole number of 512-byte sectors/);
    } finally {
      await server.stop();
    }
  });
});

// ---- fake servers ----

type Behaviour = (s: Socket, reader: FrameReader) => Promise<void>;

interface Fake {
  socket: string;
  uri: string;
  close(): Promise<void>;
}

/** A one-purpose server on a Unix socket (or 127.0.0.1): `behaviour` runs per connection; close() drops everything. */
async function fakeServer(behaviour: Behaviour, tcp = false): Promise<Fake> {
  const socket = newSocket();
  const open = new Set<Socket>();
  const server: Server = createServer((s) => {
    open.add(s);
    s.on('close', () => open.delete(s));
    s.on('error', () => undefined);
    behaviour(s, new FrameReader(s, 'client')).catch(() => s.destroy());
  });
  await new Promise<void>((resolve) => (tcp ? server.listen(0, '127.0.0.1', resolve) : server.listen(socket, resolve)));
  const port = (server.address() as { port?: number }).port;
  return {
    socket,
    uri: tcp ? `nbd://127.0.0.1:${port}/` : unixUri(socket),
    close: async () => {
      for (const s of open) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

interface FakeExport {
  size?: number;
  structured?: boolean;
  /** Select base:allocation (context id 7) when asked. */
  allocation?: boolean;
}

/** The handshake a plain server would do, up to and including GO. */
async function negotiate(s: Socket, reader: FrameReader, exp: FakeExport = {}): Promise<void> {
  const { size = 4 * MiB, structured = true, allocation = false } = exp;
  s.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  await reader.read(4, 'client flags');
  for (;;) {
    const h = parseOptionHeader(await reader.read(OPTION_HEADER_SIZE, 'option'));
    const data = h.length > 0 ? await reader.read(h.length, 'option data') : Buffer.alloc(0);
    if (h.option === Option.STRUCTURED_REPLY) s.write(encodeOptionReply(h.option, structured ? OptionReply.ACK : OptionReply.ERR_UNSUP));
    else if (h.option === Option.SET_META_CONTEXT) {
      if (allocation && parseMetaContext(data).queries.includes('base:allocation')) s.write(encodeOptionReply(h.option, OptionReply.META_CONTEXT, encodeMetaContextReply(7, 'base:allocation')));
      s.write(encodeOptionReply(h.option, OptionReply.ACK));
    } else if (h.option === Option.GO) {
      s.write(encodeOptionReply(h.option, OptionReply.INFO, encodeInfoExport(size, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)));
      s.write(encodeOptionReply(h.option, OptionReply.ACK));
      return;
    } else s.write(encodeOptionReply(h.option, OptionReply.ERR_UNSUP));
  }
}

const nextRequest = async (reader: FrameReader): Promise<Request> => parseRequest(await reader.read(REQUEST_SIZE, 'request'))!;

/** Send junk until the client hangs up (or `limit` bytes): a client that buffered it would grow by that much. */
function flood(s: Socket, limit = 512 * MiB): void {
  const junk = Buffer.alloc(MiB, 0x5a);
  let sent = 0;
  const more = () => {
    while (!s.destroyed && sent < limit) {
      sent += junk.length;
      if (!s.write(junk)) return void s.once('drain', more);
    }
  };
  more();
}

const hostile: Array<{ name: string; problem: RegExp; behaviour: Behaviour }> = [
  { name: 'a greeting cut short', problem: /connection closed in the middle of greeting \(10 of 16 bytes\)/, behaviour: async (s) => void s.end(encodeGreeting(3).subarray(0, 10)) },
  { name: 'something that is not NBD', problem: /not an NBD server/, behaviour: async (s) => void s.end('SSH-2.0-OpenSSH_9.2p1 Debian\r\n') },
  {
    name: 'a greeting with a bad second magic',
    problem: /greeting has a bad magic/,
    behaviour: async (s) => {
      const g = encodeGreeting(3);
      g.write('IHAVEOPX', 8, 'latin1');
      s.end(g);
    },
  },
  {
    name: 'an option reply claiming 4 GiB',
    problem: /the reply to STRUCTURED_REPLY claims 4294967295 bytes \(at most 65536\)/,
    behaviour: async (s, reader) => {
      s.write(encodeGreeting(3));
      await reader.read(4 + OPTION_HEADER_SIZE, 'flags and first option');
      const header = encodeOptionReply(Option.STRUCTURED_REPLY, OptionReply.ACK);
      header.writeUInt32BE(0xffffffff, 16);
      s.write(header);
      flood(s);
    },
  },
  {
    name: 'a READ reply chunk with a lying length',
    problem: /READ at 0 \(\+262144\): an OFFSET_DATA chunk claims 2147483647 bytes for a read of 262144/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      s.write(encodeChunkHeader(req.cookie, Chunk.OFFSET_DATA, 0x7fffffff, true));
      flood(s);
    },
  },
  {
    name: 'a chunk outside its request',
    problem: /READ at 0 \(\+262144\): an OFFSET_DATA chunk at 262144 \(\+512\) lies outside the request/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      s.write(Buffer.concat(encodeDataChunk(req.cookie, req.offset + req.length, Buffer.alloc(512, 1), false)));
    },
  },
  {
    name: 'overlapping chunks',
    problem: /an OFFSET_HOLE chunk at 4096 \(\+4096\) overlaps data already received/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      s.write(Buffer.concat(encodeDataChunk(req.cookie, 0, Buffer.alloc(8192, 1), false)));
      s.write(encodeHoleChunk(req.cookie, 4096, 4096, true));
    },
  },
  {
    name: 'a reply to a cookie never sent',
    problem: /a reply carries cookie 100\d, which matches no request in flight/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      s.write(encodeNoneChunk(req.cookie + 1000n));
    },
  },
  {
    name: 'a connection closed in the middle of a reply',
    problem: /connection closed in the middle of READ at 0 \(\+262144\): OFFSET_DATA chunk \(1000 of 262144 bytes\)/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      const [header, at, data] = encodeDataChunk(req.cookie, 0, Buffer.alloc(req.length, 7), true);
      s.end(Buffer.concat([header!, at!, data!.subarray(0, 1000)]));
    },
  },
  {
    name: 'a reply marked done with bytes missing',
    problem: /READ at 0 \(\+262144\): the reply ended with 131072 of 262144 bytes never sent/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      const req = await nextRequest(reader);
      s.write(Buffer.concat(encodeDataChunk(req.cookie, 0, Buffer.alloc(req.length / 2, 7), true)));
    },
  },
  {
    name: 'a simple reply with an unknown error',
    problem: /READ at \d+ \(\+262144\) failed: error 4660$/m,
    behaviour: async (s, reader) => {
      await negotiate(s, reader, { structured: false });
      for (;;) s.write(encodeSimpleReply((await nextRequest(reader)).cookie, 4660));
    },
  },
  {
    name: 'a reply with a bad magic',
    problem: /a reply has a bad magic \(0x5a5a5a5a\)/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      await nextRequest(reader);
      flood(s);
    },
  },
  {
    name: 'extents past the request',
    problem: /BLOCK_STATUS at 0 \(\+2097152\): the extents run past the end of the request/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader, { allocation: true });
      const req = await nextRequest(reader);
      s.write(encodeBlockStatusChunk(req.cookie, 7, [{ length: 4 * MiB, flags: 0 }, { length: 512, flags: 3 }], true));
    },
  },
  {
    name: 'a server that never answers a READ',
    problem: /no reply from the server in 2 s to READ at \d+ \(\+262144\) \(VHDVAULT_NBD_TIMEOUT=<seconds> sets the limit\)/,
    behaviour: async (s, reader) => {
      await negotiate(s, reader);
      await nextRequest(reader); // and then silence
    },
  },
  { name: 'a server that never greets', problem: /no answer from the server in 2 s while connecting/, behaviour: async () => undefined },
];

describe('a hostile server ends the backup with one line, and adds nothing', () => {
  const repo = join(dir, 'repo-hostile');
  beforeAll(() => initRepo(repo, 'dir'));

  it.each(hostile.map((c, i) => ({ ...c, disk: `vm${i}` })))('$name', async ({ problem, behaviour, disk }) => {
    const fake = await fakeServer(behaviour);
    try {
      const r = await vhdvaultMeasured({ VHDVAULT_NBD_TIMEOUT: '2' }, join(dir, `${disk}.time`), 'backup', repo, disk, '--source', unixUri(fake.socket));
      expectRefused(r, `nbd+unix:///?socket=${fake.socket}: `, problem);
      expect(r.elapsedMs).toBeLessThan(15_000);
      // No reply is buffered whole on a peer's word: a few hundred MiB of junk must not show up here.
      if (r.maxRssKiB !== null) expect(r.maxRssKiB).toBeLessThan(250 * 1024);
    } finally {
      await fake.close();
    }
    expect((await listed(repo)).filter((b) => b.disk === disk)).toEqual([]);
  });
});

describe('the client in this process', () => {
  it('reassembles replies that come out of order, in chunks of data and holes, one byte per write', async () => {
    const pattern = (offset: number, length: number) => Buffer.from(Array.from({ length }, (_, i) => ((offset + i) * 7) & 0xff));
    const fake = await fakeServer(async (s, reader) => {
      await negotiate(s, reader, { size: MiB });
      const reqs = [await nextRequest(reader), await nextRequest(reader), await nextRequest(reader)];
      const bytes: Buffer[] = [];
      for (const req of reqs.reverse()) {
        const half = req.length / 2;
        // Second half first, as data; then the first half as a hole; the final chunk is NONE.
        bytes.push(...encodeDataChunk(req.cookie, req.offset + half, pattern(req.offset + half, half), false));
        bytes.push(encodeHoleChunk(req.cookie, req.offset, half, false), encodeNoneChunk(req.cookie));
      }
      const all = Buffer.concat(bytes);
      for (let i = 0; i < all.length; i++) s.write(all.subarray(i, i + 1));
    });
    const client = await NbdClient.connect(unixUri(fake.socket), { timeoutMs: 5000 });
    try {
      const reads = await Promise.all([client.read(0, 4096), client.read(8192, 1024), client.read(MiB - 512, 512)]);
      expect(reads[0]).toEqual(Buffer.concat([Buffer.alloc(2048), pattern(2048, 2048)]));
      expect(reads[1]).toEqual(Buffer.concat([Buffer.alloc(512), pattern(8704, 512)]));
      expect(reads[2]).toEqual(Buffer.concat([Buffer.alloc(256), pattern(MiB - 256, 256)]));
      expect(client.runState).toBe('connected');
    } finally {
      await client.disconnect();
      await fake.close();
    }
    expect(client.runState).toBe('closed');
    await expect(client.read(0, 512)).rejects.toThrow(/connection is closed/);
  });

  it.each([
    ['an old fixed-newstyle server refuses GO and structured replies', HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES],
    ['a plain newstyle server knows only EXPORT_NAME (and sends its 124 zeros)', 0],
  ])('%s: EXPORT_NAME and simple replies', async (_, serverFlags) => {
    const data = Buffer.from(Array.from({ length: 8192 }, (_, i) => i % 251));
    const options: number[] = [];
    const fake = await fakeServer(async (s, reader) => {
      s.write(encodeGreeting(serverFlags));
      const clientFlags = (await reader.read(4, 'client flags')).readUInt32BE(0);
      for (;;) {
        const h = parseOptionHeader(await reader.read(OPTION_HEADER_SIZE, 'option'));
        const name = h.length > 0 ? await reader.read(h.length, 'option data') : Buffer.alloc(0);
        options.push(h.option);
        if (h.option !== Option.EXPORT_NAME) {
          s.write(encodeOptionReply(h.option, OptionReply.ERR_UNSUP));
          continue;
        }
        expect(name.toString()).toBe('disk');
        s.write(encodeExportNameReply(data.length, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, (clientFlags & HandshakeFlag.NO_ZEROES) !== 0));
        break;
      }
      for (;;) {
        const req = await nextRequest(reader);
        s.write(Buffer.concat([encodeSimpleReply(req.cookie, 0), data.subarray(req.offset, req.offset + req.length)]));
      }
    });
    const client = await NbdClient.connect(`nbd+unix:///disk?socket=${fake.socket}`, { contexts: ['base:allocation'], timeoutMs: 5000 });
    try {
      expect(client).toMatchObject({ size: 8192, structuredReplies: false, readOnly: true });
      expect(client.hasContext('base:allocation')).toBe(false);
      expect(await client.read(1000, 3000)).toEqual(data.subarray(1000, 4000));
      expect(options).toEqual(serverFlags ? [Option.STRUCTURED_REPLY, Option.GO, Option.EXPORT_NAME] : [Option.EXPORT_NAME]);
    } finally {
      await client.disconnect();
      await fake.close();
    }
  });

  it('a broken reply fails every request in flight, and every later call, with the same error (over TCP)', async () => {
    const fake = await fakeServer(async (s, reader) => {
      await negotiate(s, reader, { size: MiB });
      await nextRequest(reader);
      await nextRequest(reader);
      s.write(encodeNoneChunk(999n));
    }, true);
    const client = await NbdClient.connect(fake.uri, { timeoutMs: 5000 });
    try {
      const results = await Promise.allSettled([client.read(0, 512), client.read(512, 512)]);
      const reasons = results.map((r) => (r.status === 'rejected' ? (r.reason as Error).message : 'fulfilled'));
      expect(reasons[0]).toMatch(/cookie 999, which matches no request in flight/);
      expect(reasons[1]).toBe(reasons[0]);
      expect(client.runState).toBe('dead');
      await expect(client.read(0, 512)).rejects.toThrow(reasons[0]);
    } finally {
      await client.disconnect();
      await fake.close();
    }
  });

  it('writes, flushes, trims and zeroes against nbdkit memory, and reads them back', { skip: !hasNbdkit }, async () => {
    const server = await nbdkit(newSocket(), ['memory', '4M']);
    const client = await NbdClient.connect(unixUri(server.socket), { contexts: ['base:allocation'] });
    try {
      await client.write(MiB, Buffer.alloc(64 * 1024, 0xee), { fua: true });
      await client.writeZeroes(MiB + 4096, 4096);
      await client.flush();
      const back = await client.read(MiB, 64 * 1024);
      expect(back.subarray(0, 4096)).toEqual(Buffer.alloc(4096, 0xee));
      expect(back.subarray(4096, 8192)).toEqual(Buffer.alloc(4096));
      expect(back.subarray(8192)).toEqual(Buffer.alloc(64 * 1024 - 8192, 0xee));
      await client.trim(MiB, 64 * 1024);
      expect(await client.read(MiB, 4096)).toEqual(Buffer.alloc(4096));
      const extents = await client.blockStatus(0, 4 * MiB, 'base:allocation');
      expect(extents.reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(4 * MiB);
      await expect(client.read(4 * MiB - 512, 1024)).rejects.toThrow(/past the end of the export/);
    } finally {
      await client.disconnect();
      await server.stop();
    }
  });
});
