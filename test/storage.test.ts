/**
 * The storage seam's contract (docs/design/04-repository.md §4.13), run against both backends: a local
 * folder and a bucket of each S3 engine of the tests (helpers/s3.ts): s3rver, which ignores
 * If-None-Match, so exclusive creates rest on the claims protocol, and Ceph's RADOS Gateway,
 * a real distributed store that honours it. Then S3 alone (s3rver): retries through a
 * proxy that fails and stalls requests, and the one-line errors a user sees.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pLimit from 'p-limit';
import { afterAll, describe, expect, it } from 'vitest';
import { LocalStorage } from '../src/storage/LocalStorage.js';
import { openStorage } from '../src/storage/open.js';
import { openS3Storage, type S3Options, type S3Storage } from '../src/storage/S3Storage.js';
import { isS3Uri, parseS3Uri } from '../src/storage/s3Uri.js';
import { NotFoundError, type S3Descriptor, type Storage, StorageError } from '../src/storage/Storage.js';
import { UsageError } from '../src/util/errors.js';
import { startFaultProxy } from './helpers/faultProxy.js';
import { newBucket, s3Engines, s3Env } from './helpers/s3.js';

const engines = s3Engines();
// s3rver's is also the server of the retries and errors below, and the environment's endpoint. The helper stops the engines' servers after the file.
const s3 = await engines.find((e) => e.name === 's3rver')!.server();
Object.assign(process.env, s3Env(s3.endpoint));
const temp = await mkdtemp(join(tmpdir(), 'vhdvault-storage-'));
const opened: Storage[] = [];
afterAll(async () => {
  for (const s of opened) (s as { close?: () => void }).close?.();
  await rm(temp, { recursive: true, force: true });
});

async function s3Storage(d: S3Descriptor, options?: S3Options): Promise<Storage> {
  const s = await openS3Storage(d, options);
  opened.push(s);
  return s;
}

interface Backend {
  name: string;
  /** Why its tests are skipped here (an S3 engine that is not installed), else undefined. */
  skip?: string;
  /** A fresh, empty repository, and a way to open it again (another process, as far as it can tell). */
  fresh(options?: S3Options): Promise<{ storage: Storage; again(): Promise<Storage> }>;
  /** An S3 engine: whether it honours `If-None-Match: *` (Ceph does; s3rver ignores it). */
  conditional?: boolean;
}

let folders = 0;
const backends: Backend[] = [
  {
    name: 'local folder',
    async fresh() {
      const root = join(temp, `repo-${folders++}`);
      return { storage: new LocalStorage(root), again: async () => new LocalStorage(root) };
    },
  },
  ...engines.map(
    (engine): Backend => ({
      name: `S3 (${engine.title})`,
      skip: engine.skip,
      conditional: engine.name === 'ceph',
      async fresh(options?: S3Options) {
        const { endpoint } = await engine.server();
        const d: S3Descriptor = { kind: 's3', bucket: await newBucket(endpoint), prefix: 'repo/x', endpoint };
        return { storage: await s3Storage(d, options), again: () => s3Storage(d, options) };
      },
    }),
  ),
];

async function all(storage: Storage, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  for await (const o of storage.listAll(prefix)) keys.push(o.key);
  return keys.sort();
}

function contract(backend: Backend): void {
  it('gets objects whole and in ranges, past the end included', async () => {
    const { storage } = await backend.fresh();
    await storage.put('a/b.bin', Buffer.from('0123456789'));
    expect((await storage.get('a/b.bin')).toString()).toBe('0123456789');
    expect((await storage.get('a/b.bin', { offset: 2, length: 3 })).toString()).toBe('234');
    expect((await storage.get('a/b.bin', { offset: 8, length: 5 })).toString()).toBe('89');
    expect((await storage.get('a/b.bin', { offset: 10, length: 4 })).length).toBe(0);
    expect((await storage.get('a/b.bin', { offset: 50, length: 4 })).length).toBe(0);
    await expect(storage.get('a/missing')).rejects.toBeInstanceOf(NotFoundError);
    await expect(storage.get('nothing/here', { offset: 0, length: 1 })).rejects.toBeInstanceOf(NotFoundError);
  });

  it('heads an object, a prefix and nothing', async () => {
    const { storage } = await backend.fresh();
    const before = Date.now();
    await storage.put('d/obj', 'hello');
    const info = await storage.head('d/obj');
    expect(info).toMatchObject({ size: 5, prefix: false });
    expect(Math.abs(info!.mtimeMs - before)).toBeLessThan(60_000);
    expect(await storage.head('d')).toMatchObject({ prefix: true });
    expect(await storage.head('')).toMatchObject({ prefix: true });
    expect(await storage.head('d/none')).toBeNull();
    expect(await storage.head('none')).toBeNull();
  });

  it('lists one level: objects and sub-prefixes, sorted', async () => {
    const { storage } = await backend.fresh();
    expect(await storage.list('')).toEqual([]);
    // Not 'top/c/d/e': s3rver omits a common prefix whose objects all lie two or more levels below it (S3 does not).
    for (const k of ['top/b', 'top/a/1', 'top/a/2', 'top/c/d', 'top.json', 'other']) await storage.put(k, k);
    expect(await storage.list('')).toEqual(['other', 'top', 'top.json']);
    expect(await storage.list('top')).toEqual(['a', 'b', 'c']);
    expect(await storage.list('top/c')).toEqual(['d']);
    expect(await storage.list('top/b')).toEqual([]);
    expect(await storage.list('none')).toEqual([]);
  });

  it('puts: overwrites, or with ifAbsent leaves what is there', async () => {
    const { storage } = await backend.fresh();
    expect(await storage.put('k', 'one')).toBe(true);
    expect(await storage.put('k', 'two')).toBe(true);
    expect((await storage.get('k')).toString()).toBe('two');
    expect(await storage.put('k', 'three', { ifAbsent: true })).toBe(false);
    expect((await storage.get('k')).toString()).toBe('two');
    expect(await storage.put('new/k', 'four', { ifAbsent: true })).toBe(true);
    expect((await storage.get('new/k')).toString()).toBe('four');
    expect(await storage.put('empty', '')).toBe(true);
    expect((await storage.get('empty')).length).toBe(0);
  });

  it('20 concurrent exclusive creates of one key from separate instances: exactly one wins', async () => {
    const { storage, again } = await backend.fresh();
    await storage.put('locks/.keep', '');
    const instances = await Promise.all(Array.from({ length: 20 }, () => again()));
    const results = await Promise.all(instances.map((s, i) => s.put('locks/lock', `winner ${i}`, { ifAbsent: true })));
    expect(results.filter((r) => r)).toHaveLength(1);
    expect((await storage.get('locks/lock')).toString()).toBe(`winner ${results.indexOf(true)}`);
    // The claims an object store used are gone, and never shown.
    expect(await storage.list('')).toEqual(['locks']);
    expect(await all(storage, '')).toEqual(['locks/.keep', 'locks/lock']);
  });

  it.skipIf(backend.conditional === undefined)('knows whether the store honours If-None-Match (asked once, of a probe it removes)', async () => {
    const { storage } = await backend.fresh();
    expect(await (storage as S3Storage).conditionalWrites()).toBe(backend.conditional);
    expect(await all(storage, '')).toEqual([]);
    expect(await storage.list('.claims')).toEqual([]);
  });

  it.skipIf(backend.conditional === undefined)('20 concurrent exclusive creates through claims (conditional writes off): exactly one wins', async () => {
    const { storage, again } = await backend.fresh({ conditionalWrites: 'off' });
    const instances = await Promise.all(Array.from({ length: 20 }, () => again()));
    const results = await Promise.all(instances.map((s, i) => s.put('lock', `winner ${i}`, { ifAbsent: true })));
    expect(results.filter((r) => r)).toHaveLength(1);
    expect((await storage.get('lock')).toString()).toBe(`winner ${results.indexOf(true)}`);
    expect(await storage.list('.claims')).toEqual([]);
  });

  it('creates, then syncs', async () => {
    const { storage } = await backend.fresh();
    await storage.put('staged/.keep', '');
    await storage.create('staged/block', [Buffer.from('ab'), Buffer.from('cd')]);
    await storage.sync('staged');
    expect((await storage.get('staged/block')).toString()).toBe('abcd');
  });

  it('deletes an object, a prefix, and nothing', async () => {
    const { storage } = await backend.fresh();
    for (const k of ['p/one', 'p/q/two', 'p/q/r/three', 'keep']) await storage.put(k, 'x');
    await storage.delete('p/one');
    expect(await storage.head('p/one')).toBeNull();
    await storage.delete('p');
    expect(await storage.head('p')).toBeNull();
    expect(await storage.list('')).toEqual(['keep']);
    await storage.delete('p');
    await storage.delete('never/was');
  });

  it('deletes many objects, missing ones among them', async () => {
    const { storage } = await backend.fresh();
    for (const k of ['m/1', 'm/2', 'm/n/3', 'm/4']) await storage.put(k, 'x');
    await storage.deleteMany(['m/1', 'm/n/3', 'm/missing', 'gone/too', 'm/1']);
    expect(await all(storage, 'm')).toEqual(['m/2', 'm/4']);
    await storage.deleteMany([]);
  });

  it('lists everything below a prefix, nested and past one page (1100 objects)', async () => {
    const { storage } = await backend.fresh();
    const limit = pLimit(32);
    for (let f = 0; f < 10; f++) await storage.put(`many/${f}/seed`, 'x');
    const keys = Array.from({ length: 1100 }, (_, i) => `many/${i % 10}/${i}`);
    await Promise.all(keys.map((k) => limit(() => storage.create(k, [Buffer.from('y')]))));
    await storage.sync('many');
    await storage.put('other/z', 'zz');
    const found = new Map<string, number>();
    for await (const o of storage.listAll('many')) found.set(o.key, o.size);
    expect(found.size).toBe(1110);
    expect(found.get('many/3/1093')).toBe(1);
    expect(await all(storage, '')).toHaveLength(1111);
    expect(await all(storage, 'many/3')).toHaveLength(111);
    expect(await all(storage, 'none')).toEqual([]);
    await storage.deleteMany([...found.keys()]);
    expect(await all(storage, '')).toEqual(['other/z']);
  });

  it('applies a batch in order', async () => {
    const { storage } = await backend.fresh();
    await storage.put('b/old', 'x');
    await storage.batch([{ put: 'b/a', data: '1' }, { put: 'b/a', data: '2' }, { delete: 'b/old' }, { put: 'b/c', data: Buffer.from('3') }, { delete: 'b/c' }, { put: 'b/c', data: '4' }]);
    expect((await storage.get('b/a')).toString()).toBe('2');
    expect((await storage.get('b/c')).toString()).toBe('4');
    expect(await storage.head('b/old')).toBeNull();
    if (!storage.capabilities.rename) await expect(storage.batch([{ rename: 'b/a', to: 'b/z' }])).rejects.toThrow('an object store cannot rename');
  });

  it('describes keys as the user knows them, and reopens from its descriptor', async () => {
    const { storage } = await backend.fresh();
    await storage.put('x/y', 'reopened');
    const d = storage.descriptor;
    expect(storage.describe('x/y')).toBe(d.kind === 'local' ? join(d.root, 'x', 'y') : `s3://${d.bucket}/repo/x/x/y`);
    expect(storage.describe('')).toBe(d.kind === 'local' ? d.root : `s3://${d.bucket}/repo/x`);
    const reopened = await openStorage(JSON.parse(JSON.stringify(d)));
    opened.push(reopened);
    expect((await reopened.get('x/y')).toString()).toBe('reopened');
  });
}

for (const backend of backends) describe.skipIf(backend.skip !== undefined)(`storage contract: ${backend.name}`, () => contract(backend));

describe('S3 storage: retries and errors', () => {
  it('retries server errors: 50 puts and gets through a proxy failing 30% of requests', async () => {
    const proxy = await startFaultProxy(s3.endpoint, { errorRate: 0.3, seed: 7, maxInARow: 2 });
    try {
      const storage = await s3Storage({ kind: 's3', bucket: await newBucket(s3.endpoint), prefix: 'r', endpoint: proxy.endpoint });
      const n = Array.from({ length: 50 }, (_, i) => i);
      await Promise.all(n.map((i) => storage.put(`o/${i}`, `value ${i}`)));
      expect(await Promise.all(n.map(async (i) => (await storage.get(`o/${i}`)).toString()))).toEqual(n.map((i) => `value ${i}`));
      expect(proxy.stats.errors).toBeGreaterThan(10);
    } finally {
      await proxy.close();
    }
  });

  it('gives up on a store that always fails: one line, in bounded time', async () => {
    const proxy = await startFaultProxy(s3.endpoint, { errorRate: 1 });
    try {
      const storage = await s3Storage({ kind: 's3', bucket: 'never-reached', prefix: 'r', endpoint: proxy.endpoint }, { maxAttempts: 3 });
      const start = Date.now();
      const err = await storage.put('k', 'v').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(StorageError);
      expect((err as Error).message).toBe('s3://never-reached/r/k: server error 500 after 3 attempts');
      expect((err as StorageError).code).toBe('S3_500');
      expect(proxy.stats.requests).toBe(3);
      expect(Date.now() - start).toBeLessThan(5_000);
    } finally {
      await proxy.close();
    }
  });

  it('retries requests that time out: 30 puts and gets through a proxy stalling 30% of requests', async () => {
    const proxy = await startFaultProxy(s3.endpoint, { stallRate: 0.3, seed: 3, maxInARow: 3 });
    try {
      const storage = await s3Storage({ kind: 's3', bucket: await newBucket(s3.endpoint), prefix: 'r', endpoint: proxy.endpoint }, { timeoutMs: 300, maxAttempts: 8 });
      const n = Array.from({ length: 15 }, (_, i) => i);
      await Promise.all(n.map((i) => storage.put(`o/${i}`, `value ${i}`)));
      expect(await Promise.all(n.map(async (i) => (await storage.get(`o/${i}`)).toString()))).toEqual(n.map((i) => `value ${i}`));
      expect(proxy.stats.stalls).toBeGreaterThan(3);
    } finally {
      await proxy.close();
    }
  });

  it('says when the store never answers', async () => {
    const proxy = await startFaultProxy(s3.endpoint, { stallRate: 1 });
    try {
      const storage = await s3Storage({ kind: 's3', bucket: 'never-reached', prefix: 'r', endpoint: proxy.endpoint }, { timeoutMs: 200, maxAttempts: 2 });
      await expect(storage.get('k')).rejects.toThrow('s3://never-reached/r/k: timed out after 2 attempts');
      expect(proxy.stats.stalls).toBe(2);
    } finally {
      await proxy.close();
    }
  });

  it('says a bucket does not exist', async () => {
    const storage = await s3Storage({ kind: 's3', bucket: 'no-such-bucket-here', prefix: 'r' });
    await expect(storage.put('k', 'v')).rejects.toThrow('s3://no-such-bucket-here/r/k: bucket "no-such-bucket-here" does not exist');
    await expect(storage.head('k')).rejects.toThrow('bucket "no-such-bucket-here" does not exist');
    await expect(storage.get('k')).rejects.toMatchObject({ code: 'NoSuchBucket' });
  });

  it('says an endpoint cannot be reached', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as { port: number }).port;
    await new Promise((resolve) => closed.close(resolve));
    const endpoint = `http://127.0.0.1:${port}`;
    const storage = await s3Storage({ kind: 's3', bucket: 'any-bucket', prefix: '', endpoint }, { maxAttempts: 2 });
    await expect(storage.head('k')).rejects.toThrow(`s3://any-bucket/k: cannot reach ${endpoint}: ECONNREFUSED`);
  });
});

describe('s3:// URIs', () => {
  it('parse into a bucket and a prefix', () => {
    expect(isS3Uri('s3://b')).toBe(true);
    expect(isS3Uri('/srv/s3://x')).toBe(false);
    expect(parseS3Uri('s3://my-bucket')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Uri('s3://my.bucket/')).toEqual({ bucket: 'my.bucket', prefix: '' });
    expect(parseS3Uri('s3://b12/backups/vm1/')).toEqual({ bucket: 'b12', prefix: 'backups/vm1' });
  });

  it.each([
    ['s3://', 'the bucket name is missing'],
    ['s3:///prefix', 'the bucket name is missing'],
    ['s3://ab/x', '"ab" is not a valid bucket name'],
    ['s3://My_Bucket/x', 'is not a valid bucket name'],
    ['s3://bucket/a//b', 'empty parts'],
    ['s3://bucket/a/../b', '".." parts'],
    ['s3://bucket/./b', '"." parts'],
    ['s3://bucket/a\0b', 'NUL'],
  ])('refuse %j', (uri, problem) => {
    expect(() => parseS3Uri(uri)).toThrow(UsageError);
    expect(() => parseS3Uri(uri)).toThrow(problem);
  });
});
