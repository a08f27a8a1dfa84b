/**
 * The QMP client (src/qmp/): its wire format on its own, then against a real
 * qemu-storage-daemon (the wrappers' argument shapes, events, a daemon that
 * dies), then against fake monitors written here that break QMP in one way
 * each. Nothing waits a fixed time: sockets, replies and events are awaited.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { readFile, stat } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from './helpers/files.js';
import { hasQsd, nbdUri, type Qsd, run, startQsd } from './helpers/qsd.js';
import { NbdClient } from '../src/nbd/NbdClient.js';
import {
  blockDirtyBitmapAdd,
  blockDirtyBitmapDisable,
  blockDirtyBitmapEnable,
  blockDirtyBitmapMerge,
  blockDirtyBitmapRemove,
  blockdevAdd,
  blockdevDel,
  blockdevReopen,
  blockExportAdd,
  blockExportDel,
  nbdServerStart,
  nbdServerStop,
  qomSet,
  queryBlockExports,
  queryNamedBlockNodes,
  queryVersion,
} from '../src/qmp/commands.js';
import { QmpCommandError, QmpDisconnectedError, QmpError, QmpProtocolError, QmpStateError, QmpTimeoutError } from '../src/qmp/errors.js';
import { QmpClient } from '../src/qmp/QmpClient.js';
import { isErrorReply, isGreeting, isReturn, LineSplitter, Malformed, MAX_LINE, parseEvent, parseLine, type QmpEvent } from '../src/qmp/qmpWire.js';
import { VaultError } from '../src/util/errors.js';

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-qmp-');
let sockets = 0;
const newSocket = () => join(dir, `s${++sockets}.sock`);

/** What `promise` rejects with (fails the test if it resolves). */
async function failure(promise: Promise<unknown>): Promise<Error> {
  return promise.then(
    () => expect.unreachable('expected a failure'),
    (err: Error) => err,
  );
}

describe('qmpWire', () => {
  const text = '{"return": {}, "id": "a"}\r\n{"event": "STOP"}\r\n';

  it('splits lines wherever the chunks break, CRLF or LF, multi-byte characters included', () => {
    const bytes = Buffer.from(`${text}{"return": "é€"}\n`);
    for (const at of [0, 1, 10, 25, 26, 27, bytes.length - 3, bytes.length - 1]) {
      const s = new LineSplitter();
      expect([...s.push(bytes.subarray(0, at)), ...s.push(bytes.subarray(at))]).toEqual(['{"return": {}, "id": "a"}', '{"event": "STOP"}', '{"return": "é€"}']);
    }
    const s = new LineSplitter();
    const lines = [...bytes].flatMap((b) => s.push(Buffer.from([b])));
    expect(lines.map((l) => parseLine(l))).toEqual([{ return: {}, id: 'a' }, { event: 'STOP' }, { return: 'é€' }]);
  });

  it('refuses a line over the cap, finished or not, without buffering it', () => {
    expect(() => new LineSplitter(8).push(Buffer.from('123456789'))).toThrow(Malformed);
    expect(() => new LineSplitter(8).push(Buffer.from('123456789\n'))).toThrow('a message longer than');
    const s = new LineSplitter(8);
    expect(s.push(Buffer.from('12345678\n1234'))).toEqual(['12345678']);
    expect(() => s.push(Buffer.from('56789'))).toThrow(Malformed);
  });

  it('tells greetings, returns, errors and events apart', () => {
    const greeting = parseLine('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}');
    expect(isGreeting(greeting)).toBe(true);
    expect(isGreeting(parseLine('{"QMP": {"version": {"qemu": {"major": "7"}}, "capabilities": []}}'))).toBe(false);
    expect(isReturn(parseLine('{"return": [], "id": 1}'))).toBe(true);
    expect(isErrorReply(parseLine('{"error": {"class": "GenericError", "desc": "no"}}'))).toBe(true);
    expect(isErrorReply(parseLine('{"error": "no"}'))).toBe(false);
    expect(parseEvent(parseLine('{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}'))).toEqual({ event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } });
    expect(parseEvent(parseLine('{"return": {}}'))).toBeNull();
    expect(() => parseLine('[1]')).toThrow('not a QMP message: "[1]"');
    expect(() => parseLine('{"a":')).toThrow('not JSON: "{\\"a\\":"');
  });
});

describe.skipIf(!hasQsd)('against qemu-storage-daemon', () => {
  let qsd: Qsd;
  let qmp: QmpClient;

  beforeAll(async () => {
    qsd = await startQsd({ format: 'qcow2' });
    qmp = await QmpClient.connect(qsd.qmpSocket, { timeoutMs: 10_000 });
  });
  afterAll(() => qmp?.close());

  const node = async (name: string) => (await queryNamedBlockNodes(qmp)).find((n) => n.nodeName === name);
  const bitmap = async (name: string) => (await node('disk0'))!.dirtyBitmaps.find((b) => b.name === name);
  const guestWrite = (pattern: number, offset: number, length: number) => run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, qsd.guestUri]);

  it('connects, negotiates and reads the version', async () => {
    expect(qmp.runState).toBe('connected');
    expect(qmp.version.major * 100 + qmp.version.minor).toBeGreaterThanOrEqual(702);
    const v = await queryVersion(qmp);
    expect(v).toMatchObject(qmp.version);
    expect(typeof v.package).toBe('string');
  });

  it('lists the guest nodes and export', async () => {
    const nodes = await queryNamedBlockNodes(qmp);
    expect(nodes.map((n) => [n.nodeName, n.drv]).sort()).toEqual([
      ['disk0', 'qcow2'],
      ['f0', 'file'],
      ['g0', 'raw'],
    ]);
    expect(nodes.find((n) => n.nodeName === 'f0')!.file).toBe(qsd.image);
    expect(nodes.find((n) => n.nodeName === 'disk0')).toMatchObject({ virtualSize: qsd.size, readOnly: false, dirtyBitmaps: [] });
    expect(await queryBlockExports(qmp)).toEqual([{ id: 'guest', type: 'nbd', nodeName: 'g0', shuttingDown: false }]);
  });

  it('fails a refused command alone, with QEMU class and desc', async () => {
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'vhdvault-x', persistent: false });
    const err = await failure(blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'vhdvault-x', persistent: false }));
    expect(err).toBeInstanceOf(QmpCommandError);
    expect(err).toBeInstanceOf(VaultError); // the CLI's one-line report
    expect(err).toMatchObject({ command: 'block-dirty-bitmap-add', errorClass: 'GenericError', desc: 'Bitmap already exists: vhdvault-x' });
    expect(err.message).toBe(`${qsd.qmpSocket}: block-dirty-bitmap-add: GenericError: Bitmap already exists: vhdvault-x`);
    expect(await failure(qmp.execute('no-such-command'))).toMatchObject({ errorClass: 'CommandNotFound' });
    expect(await failure(qmp.execute('query-block-exports', { bogus: 1 }))).toMatchObject({ desc: "Parameter 'bogus' is unexpected" });
    await blockDirtyBitmapRemove(qmp, 'disk0', 'vhdvault-x');
    expect(qmp.runState).toBe('connected');
  });

  it('adds, disables, enables, merges and removes bitmaps', async () => {
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'a', persistent: true });
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'b', persistent: false, disabled: true, granularity: 128 * 1024 });
    expect(await bitmap('a')).toEqual({ name: 'a', recording: true, persistent: true, inconsistent: false, busy: false, granularity: 65536, count: 0 });
    expect(await bitmap('b')).toMatchObject({ recording: false, persistent: false, granularity: 131072 });
    await guestWrite(0x11, 0, 64 * 1024);
    expect(await bitmap('a')).toMatchObject({ count: 65536 });
    await blockDirtyBitmapDisable(qmp, 'disk0', 'a');
    await guestWrite(0x11, MiB, 64 * 1024);
    expect(await bitmap('a')).toMatchObject({ recording: false, count: 65536 });
    await blockDirtyBitmapEnable(qmp, 'disk0', 'b');
    await guestWrite(0x11, 2 * MiB, 64 * 1024);
    expect(await bitmap('b')).toMatchObject({ recording: true, count: 128 * 1024 });
    // Both forms of a source: a name on the target's node, or node and name.
    await blockDirtyBitmapMerge(qmp, { node: 'disk0', target: 'b', bitmaps: ['a', { node: 'disk0', name: 'a' }] });
    expect(await bitmap('b')).toMatchObject({ count: 256 * 1024 });
    // Persistent bitmaps only on formats that store them.
    const err = await failure(blockDirtyBitmapAdd(qmp, { node: 'g0', name: 'p', persistent: true }));
    expect(err).toBeInstanceOf(QmpCommandError);
    await blockDirtyBitmapRemove(qmp, 'disk0', 'a');
    await blockDirtyBitmapRemove(qmp, 'disk0', 'b');
    expect((await node('disk0'))!.dirtyBitmaps).toEqual([]);
  });

  it('adds a file node on a new raw image and deletes it', async () => {
    const image = join(qsd.dir, 'extra.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', image, String(4 * MiB)]);
    await blockdevAdd(qmp, { driver: 'file', 'node-name': 'extra', filename: image });
    expect(await node('extra')).toMatchObject({ drv: 'file', file: image, virtualSize: 4 * MiB });
    await blockdevDel(qmp, 'extra');
    expect(await node('extra')).toBeUndefined();
    expect(await failure(blockdevDel(qmp, 'extra'))).toMatchObject({ errorClass: 'GenericError' });
  });

  it('adds and deletes an export, and hears BLOCK_EXPORT_DELETED', async () => {
    const heard: QmpEvent[] = [];
    const off = qmp.on('BLOCK_EXPORT_DELETED', (e) => heard.push(e));
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'ro', persistent: false });
    const args = { type: 'nbd', id: 'x1', nodeName: 'disk0', name: 'x1', writable: false, bitmaps: ['ro'] } as const;
    const enabled = await failure(blockExportAdd(qmp, args));
    expect(enabled.message).toContain("Enabled bitmap 'ro' incompatible with readonly export");
    await blockDirtyBitmapDisable(qmp, 'disk0', 'ro');
    await blockExportAdd(qmp, args);
    expect(await queryBlockExports(qmp)).toContainEqual({ id: 'x1', type: 'nbd', nodeName: 'disk0', shuttingDown: false });
    expect(await bitmap('ro')).toMatchObject({ busy: true });
    // The raw command: the event comes before the reply, so a wait started after the reply would miss it.
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'x1', 5000);
    await qmp.execute('block-export-del', { id: 'x1' });
    expect(heard.map((e) => e.data)).toEqual([{ id: 'x1' }]);
    expect((await deleted).timestamp.seconds).toBeGreaterThan(0);
    // The wrapper waits for the event itself.
    await blockExportAdd(qmp, { ...args, id: 'x2', name: 'x2' });
    await blockExportDel(qmp, 'x2');
    expect(heard.map((e) => e.data.id)).toEqual(['x1', 'x2']);
    expect(await failure(blockExportDel(qmp, 'x2'))).toMatchObject({ desc: "Export 'x2' is not found" });
    off();
    await blockDirtyBitmapRemove(qmp, 'disk0', 'ro');
    expect((await queryBlockExports(qmp)).map((e) => e.id)).toEqual(['guest']);
  });

  it('sets a QOM property', async () => {
    // qemu-storage-daemon has no devices: a throttle group's limits stand in for a disk's `drive`.
    await qmp.execute('object-add', { 'qom-type': 'throttle-group', id: 'tg0', limits: { 'bps-write': MiB } });
    await qomSet(qmp, '/objects/tg0', 'limits', { 'bps-write': 2 * MiB });
    expect(await qmp.execute('qom-get', { path: '/objects/tg0', property: 'x-bps-write' })).toBe(2 * MiB);
    expect(await failure(qomSet(qmp, '/machine/peripheral/nope', 'drive', 'x'))).toMatchObject({ errorClass: 'DeviceNotFound' });
    await qmp.execute('object-del', { id: 'tg0' });
  });

  it('runs the live backup sequence (docs/design/09-live-backups.md §9.4) end to end', async () => {
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'prev', persistent: true });
    await guestWrite(0xaa, 0, 2 * MiB);

    // Insert the point in time: new bitmap first, filter in, previous bitmap off.
    await blockDirtyBitmapAdd(qmp, { node: 'disk0', name: 'next', persistent: true });
    const fleece = join(qsd.dir, 'fleece.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', fleece, String(qsd.size)]);
    await blockdevAdd(qmp, { driver: 'file', 'node-name': 'fleece', filename: fleece });
    await blockdevAdd(qmp, { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk0', target: 'fleece', 'on-cbw-error': 'break-snapshot', 'cbw-timeout': 45 });
    await blockdevReopen(qmp, [{ driver: 'raw', 'node-name': 'g0', file: 'cbw' }]);
    await blockDirtyBitmapDisable(qmp, 'disk0', 'prev');
    await blockdevAdd(qmp, { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
    await blockExportAdd(qmp, { type: 'nbd', id: 'backup', nodeName: 'snap', name: 'snap', writable: false, bitmaps: [{ node: 'disk0', name: 'prev' }] });

    // The guest goes on writing; the snapshot keeps the old data.
    await guestWrite(0xbb, 0, MiB);
    const out = join(qsd.dir, 'out.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', nbdUri(qsd.nbdSocket, 'snap'), out]);
    const snapshot = await readFile(out);
    expect(snapshot.length).toBe(qsd.size);
    expect(snapshot.subarray(0, 2 * MiB).every((b) => b === 0xaa)).toBe(true);
    expect((await stat(fleece)).blocks * 512).toBeGreaterThanOrEqual(MiB); // the old 1 MiB went to the fleecing image
    await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0xbb 0 ${MiB}`, qsd.guestUri]);

    // The previous bitmap, readable on the snapshot's export though it lives on disk0.
    const nbd = await NbdClient.connect(nbdUri(qsd.nbdSocket, 'snap'), { contexts: ['qemu:dirty-bitmap:prev'] });
    const extents = await nbd.blockStatus(0, qsd.size, 'qemu:dirty-bitmap:prev');
    await nbd.disconnect();
    expect(extents[0]).toEqual({ length: 2 * MiB, flags: 1 });
    expect(await bitmap('prev')).toMatchObject({ recording: false, busy: true, count: 2 * MiB });
    expect(await bitmap('next')).toMatchObject({ recording: true, count: MiB });

    // Tear down in reverse.
    await blockExportDel(qmp, 'backup');
    await blockdevDel(qmp, 'snap');
    await blockdevReopen(qmp, [{ driver: 'raw', 'node-name': 'g0', file: 'disk0' }]);
    await blockdevDel(qmp, 'cbw');
    await blockdevDel(qmp, 'fleece');
    await blockDirtyBitmapRemove(qmp, 'disk0', 'prev');
    const nodes = await queryNamedBlockNodes(qmp);
    expect(nodes.map((n) => n.nodeName).sort()).toEqual(['disk0', 'f0', 'g0']);
    expect(nodes.find((n) => n.nodeName === 'disk0')!.dirtyBitmaps.map((b) => b.name)).toEqual(['next']);
    expect((await queryBlockExports(qmp)).map((e) => e.id)).toEqual(['guest']);
  });
});

describe.skipIf(!hasQsd)('when qemu-storage-daemon stops answering or dies', () => {
  it('times a call out, drops its late reply and goes on', async () => {
    const qsd = await startQsd({ format: 'raw', size: MiB });
    const qmp = await QmpClient.connect(qsd.qmpSocket);
    process.kill(qsd.pid, 'SIGSTOP');
    const err = await failure(qmp.execute('query-version', undefined, { timeoutMs: 200 }));
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect(err.message).toBe(`${qsd.qmpSocket}: query-version: no reply within 0.2 s (QEMU may still carry it out)`);
    process.kill(qsd.pid, 'SIGCONT');
    // The late reply to query-version comes first, to an id nobody waits for.
    expect(await qmp.execute('query-block-exports')).toHaveLength(1);
    expect(qmp.runState).toBe('connected');
    await qmp.close();
    expect(qmp.runState).toBe('closed');
    expect(await failure(qmp.execute('query-version'))).toBeInstanceOf(QmpStateError);
    await qsd.stop();
  });

  it('fails pending calls and waits with QmpDisconnectedError when killed, later calls with QmpStateError', async () => {
    const qsd = await startQsd({ format: 'raw', size: MiB });
    const qmp = await QmpClient.connect(qsd.qmpSocket);
    // Stopped, it cannot answer before it dies.
    process.kill(qsd.pid, 'SIGSTOP');
    const pending = failure(qmp.execute('query-named-block-nodes'));
    const waiting = failure(qmp.waitForEvent('JOB_STATUS_CHANGE'));
    await qsd.kill();
    const err = await pending;
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect(err.message).toBe(`${qsd.qmpSocket}: query-named-block-nodes: no reply: QEMU closed the connection (did it exit?)`);
    expect(await waiting).toBeInstanceOf(QmpDisconnectedError);
    expect(qmp.runState).toBe('dead');
    const later = await failure(qmp.execute('query-version'));
    expect(later).toBeInstanceOf(QmpStateError);
    expect(later.message).toBe(`${qsd.qmpSocket}: cannot run query-version: the QMP connection is dead: QEMU closed the connection (did it exit?)`);

    // Its socket file stays behind: nobody listens there.
    const refused = await failure(QmpClient.connect(qsd.qmpSocket));
    expect(refused.message).toBe(`${qsd.qmpSocket}: connection refused (is QEMU running?)`);
    const missing = join(dir, 'none.sock');
    expect((await failure(QmpClient.connect(missing))).message).toBe(`${missing}: no such socket (is QEMU running?)`);
  });

  it('keeps a persistent bitmap over a clean stop; after a kill it is inconsistent, and a new one is lost', async () => {
    const bitmaps = async (qsd: Qsd) => {
      const qmp = await QmpClient.connect(qsd.qmpSocket);
      const found = (await queryNamedBlockNodes(qmp)).find((n) => n.nodeName === 'disk0')!.dirtyBitmaps;
      return { qmp, found };
    };
    const first = await startQsd({ size: MiB });
    const a = await bitmaps(first);
    await blockDirtyBitmapAdd(a.qmp, { node: 'disk0', name: 'kept', persistent: true });
    await a.qmp.close();
    await first.stop();
    const second = await startQsd({ image: first.image });
    const b = await bitmaps(second);
    expect(b.found).toEqual([expect.objectContaining({ name: 'kept', recording: true, inconsistent: false })]);
    await blockDirtyBitmapAdd(b.qmp, { node: 'disk0', name: 'new', persistent: true });
    await second.kill();
    const third = await startQsd({ image: first.image });
    const c = await bitmaps(third);
    // Stored only at a clean close: `new` never reached the image, and `kept` may have missed writes.
    expect(c.found).toEqual([expect.objectContaining({ name: 'kept', recording: false, inconsistent: true })]);
    await c.qmp.close();
    await third.stop();
  });

  it('stops and starts the NBD server (which takes its exports along)', async () => {
    const qsd = await startQsd({ format: 'raw', size: MiB });
    const qmp = await QmpClient.connect(qsd.qmpSocket);
    expect(await failure(nbdServerStart(qmp, newSocket()))).toMatchObject({ desc: 'NBD server already running' });
    const guestGone = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'guest');
    await nbdServerStop(qmp);
    await guestGone;
    expect(await queryBlockExports(qmp)).toEqual([]);
    const socket = newSocket();
    await nbdServerStart(qmp, socket);
    await blockExportAdd(qmp, { type: 'nbd', id: 'again', nodeName: 'g0', name: 'again', writable: true });
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 4k', nbdUri(socket, 'again')]);
    await qmp.close();
    await qsd.stop();
  });
});

describe('against fake monitors', () => {
  const servers: Server[] = [];
  afterAll(() => Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve)))));

  const greeting = (version = '7.2.0') => {
    const [major, minor, micro] = version.split('.').map(Number);
    return `${JSON.stringify({ QMP: { version: { qemu: { major, minor, micro }, package: '' }, capabilities: ['oob'] } })}\r\n`;
  };
  const reply = (id: unknown, value: unknown = {}) => `${JSON.stringify({ return: value, id })}\r\n`;
  type Command = { execute: string; id: unknown; arguments?: Record<string, unknown> };

  /** A monitor that sends `opening`, accepts qmp_capabilities and hands every other command to `onCommand`. */
  async function fake(opening: string | null, onCommand: (socket: Socket, c: Command) => void = () => {}): Promise<string> {
    const path = newSocket();
    const server = createServer((socket) => {
      socket.on('error', () => {});
      if (opening !== null) socket.write(opening);
      createInterface({ input: socket }).on('line', (line) => {
        const c = JSON.parse(line) as Command;
        if (c.execute === 'qmp_capabilities') socket.write(reply(c.id));
        else onCommand(socket, c);
      });
    });
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(path, resolve));
    return path;
  }

  it('refuses garbage instead of a greeting', async () => {
    const path = await fake('this is not JSON\r\n');
    const err = await failure(QmpClient.connect(path));
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect(err.message).toBe(`${path}: not JSON: "this is not JSON"`);
    expect((await failure(QmpClient.connect(await fake(reply(1))))).message).toContain('expected the QMP greeting, got "{\\"return\\"');
  });

  it('refuses a line over 16 MiB before it ends', async () => {
    const err = await failure(QmpClient.connect(await fake('x'.repeat(MAX_LINE + 1))));
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect(err.message).toMatch(/: a message longer than 16 MiB$/);
  });

  it('drops the connection on an oversized reply: the call fails, and every later one', async () => {
    const qmp = await QmpClient.connect(await fake(greeting(), (s, c) => s.write(`{"return": "${'y'.repeat(MAX_LINE)}", "id": ${JSON.stringify(c.id)}}\r\n`)));
    const err = await failure(qmp.execute('query-version'));
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect(err.message).toMatch(/: query-version: no reply: a message longer than 16 MiB$/);
    expect(qmp.runState).toBe('dead');
    expect(await failure(qmp.execute('query-version'))).toBeInstanceOf(QmpStateError);
  });

  it('refuses QEMU older than 7.2 by name', async () => {
    const path = await fake(greeting('6.2.0'));
    const err = await failure(QmpClient.connect(path));
    expect(err).toBeInstanceOf(QmpError);
    expect(err.message).toBe(`${path}: QEMU 6.2.0 is too old: live backups need 7.2 or later`);
    await QmpClient.connect(await fake(greeting('7.2.0'))).then((c) => c.close());
    await QmpClient.connect(await fake(greeting('10.0.1'))).then((c) => c.close());
  });

  it('gives up on a monitor that never greets, or never answers', async () => {
    const silent = await fake(null);
    const err = await failure(QmpClient.connect(silent, { timeoutMs: 300 }));
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect(err.message).toBe(`${silent}: no QMP greeting within 0.3 s (QEMU's monitor serves one client at a time: is another one connected?)`);
    const qmp = await QmpClient.connect(await fake(greeting()));
    expect((await failure(qmp.execute('query-version', undefined, { timeoutMs: 300 }))).message).toMatch(/: query-version: no reply within 0\.3 s/);
    expect((await failure(qmp.waitForEvent('STOP', undefined, 300))).message).toMatch(/: no STOP event within 0\.3 s$/);
    await qmp.close();
  });

  it('routes replies by id in any order, drops unknown ids and hands events to listeners', async () => {
    const held: Command[] = [];
    const qmp = await QmpClient.connect(
      await fake(greeting(), (s, c) => {
        held.push(c);
        if (held.length < 2) return;
        // Second answered first, with noise in between.
        s.write(reply('stranger', 'not yours'));
        s.write('{"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "concluded"}, "timestamp": {"seconds": 5, "microseconds": 6}}\r\n');
        s.write(reply(held[1]!.id, held[1]!.execute));
        s.write(`{"error": {"class": "GenericError", "desc": "no"}, "id": ${JSON.stringify(held[0]!.id)}}\r\n`);
      }),
    );
    const events: QmpEvent[] = [];
    qmp.on('*', (e) => events.push(e));
    const concluded = qmp.waitForEvent('JOB_STATUS_CHANGE', (e) => e.data.status === 'concluded');
    const first = failure(qmp.execute('first'));
    const second = qmp.execute('second');
    expect(await second).toBe('second');
    expect(await first).toMatchObject({ command: 'first', errorClass: 'GenericError', desc: 'no' });
    expect((await concluded).data).toEqual({ id: 'j', status: 'concluded' });
    expect(events.map((e) => e.event)).toEqual(['JOB_STATUS_CHANGE']);
    expect(new Set(held.map((c) => c.id)).size).toBe(2);
    await qmp.close();
  });

  it('drops the connection on a reply without an id', async () => {
    const qmp = await QmpClient.connect(await fake(greeting(), (s) => s.write('{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n')));
    const err = await failure(qmp.execute('query-version'));
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect(err.message).toContain('query-version: no reply: a reply without an id');
  });
});
