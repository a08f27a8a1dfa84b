/**
 * Each backup's digests (the objects layout's block map) are bound to it by
 * their SHA-256 in its metadata. A map swapped for another backup's of the same
 * size, in the store, is found by verify and refused by restore; a local cache
 * poisoned the same way is not trusted: the store's map is read instead, and
 * the cache keeps only the maps of backups the store still holds.
 */
import { copyFile, readdir, readFile, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { verify } from '../src/store/verify.js';
import { vhdvaultAsync } from './helpers/cli.js';
import { sameBytes, tempDir } from './helpers/files.js';
import { newBucket, s3Env, startS3 } from './helpers/s3.js';
import { backupOf, initRepo } from './helpers/store.js';

const MiB = 1024 * 1024;

/** Two backups of one 4 MiB disk with different content; the copies of the disk at each. */
async function twoBackups(root: string, dir: string): Promise<{ ids: string[]; copies: string[] }> {
  const disk = join(dir, 'disk.raw');
  const ids: string[] = [];
  const copies: string[] = [];
  for (let i = 0; i < 2; i++) {
    await writeFile(disk, Buffer.alloc(4 * MiB, 0x11 * (i + 1)));
    ids.push(await backupOf(root, 'vm', disk, { full: true }));
    copies.push(join(dir, `copy${i}.raw`));
    await copyFile(disk, copies[i]!);
  }
  return { ids, copies };
}

describe('a swapped map in the store', () => {
  for (const layout of ['dir', 'objects'] as const) {
    it(`is found by verify and refused by restore (layout ${layout})`, async () => {
      const dir = await tempDir();
      const root = join(dir, 'repo');
      await initRepo(root, layout);
      const { ids } = await twoBackups(root, dir);
      const folder = join(root, 'disks', 'vm');
      // Same size, other content: the first backup's digests in the second's place.
      await copyFile(join(folder, `${ids[0]}.digests`), join(folder, `${ids[1]}.digests`));
      const repo = await Repository.open(root);
      const report = await verify(repo, 'vm');
      expect(report.problems.map((p) => p.problem).join('\n')).toMatch(new RegExp(`is not the digests of backup ${ids[1]}`));
      await expect(restore(repo, 'vm', join(dir, 'out.raw'), { backup: ids[1] })).rejects.toThrow(/not the digests of backup|does not match its digest/);
      expect((await readdir(dir)).includes('out.raw')).toBe(false);
    });
  }
});

describe('edited metadata', () => {
  for (const layout of ['dir', 'objects'] as const) {
    it(`a size lowered by 1 MiB is found by verify and refused by restore (layout ${layout})`, async () => {
      const dir = await tempDir();
      const root = join(dir, 'repo');
      await initRepo(root, layout);
      const { ids } = await twoBackups(root, dir);
      const file = join(root, 'disks', 'vm', `${ids[1]}.json`);
      const meta = JSON.parse(await readFile(file, 'utf8')) as { size: number; sealSha256?: string };
      expect(meta.sealSha256).toMatch(/^[0-9a-f]{64}$/);
      await writeFile(file, JSON.stringify({ ...meta, size: meta.size - MiB }, null, 2));
      const repo = await Repository.open(root);
      const report = await verify(repo, 'vm');
      expect(report.problems.map((p) => `${p.id} ${p.problem}`).join('\n')).toMatch(/has been edited or damaged: its fields no longer match the SHA-256 sealed in it/);
      await expect(restore(repo, 'vm', join(dir, 'out.raw'), { backup: ids[1] })).rejects.toThrow(/has been edited or damaged/);
      expect((await readdir(dir)).includes('out.raw')).toBe(false);
    });
  }
});

describe('a poisoned map cache (objects layout on S3)', async () => {
  const s3 = await startS3();
  afterAll(() => s3.close());

  it('is not trusted: the restore reads the store and gives the backup it names', async () => {
    const dir = await tempDir();
    const cache = join(dir, 'cache');
    Object.assign(process.env, s3Env(s3.endpoint), { VHDVAULT_CACHE_DIR: cache });
    const root = `s3://${await newBucket(s3.endpoint)}/repo`;
    await initRepo(root, 'objects');
    const { ids, copies } = await twoBackups(root, dir);
    const repo = await Repository.open(root);
    // Fill the cache, then put the first backup's map in the second's cached place.
    for (const id of ids) await restore(repo, 'vm', join(dir, `warm-${id}.raw`), { backup: id });
    const maps = await findFiles(cache, '.digests');
    const [first, second] = ids.map((id) => maps.find((p) => p.endsWith(`${id}.digests`))!);
    expect(first && second).toBeTruthy();
    await writeFile(second!, await readFile(first!));
    await restore(repo, 'vm', join(dir, 'out.raw'), { backup: ids[1] });
    expect(await sameBytes(join(dir, 'out.raw'), copies[1]!)).toBe(true);
  });
});

describe('the map cache (objects layout on S3)', async () => {
  const s3 = await startS3();
  afterAll(() => s3.close());

  it('holds only the maps of backups the store still has: after a prune, and whenever it is opened', async () => {
    const dir = await tempDir();
    const cache = join(dir, 'cache');
    Object.assign(process.env, s3Env(s3.endpoint), { VHDVAULT_CACHE_DIR: cache });
    const root = `s3://${await newBucket(s3.endpoint)}/repo`;
    await initRepo(root, 'objects');
    const disk = join(dir, 'disk.raw');
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      await writeFile(disk, Buffer.alloc(4 * MiB, 0x21 * (i + 1)));
      ids.push(await backupOf(root, 'vm', disk));
    }
    const repo = await Repository.open(root);
    for (const id of ids) await restore(repo, 'vm', join(dir, `warm-${id}.raw`), { backup: id });
    const cachedIds = async () => (await findFiles(cache, '.digests')).map((p) => basename(p, '.digests')).sort();
    expect(await cachedIds()).toEqual(ids);

    const pruned = await vhdvaultAsync('prune', root, 'vm', '--keep-last', '2');
    expect(pruned.code, pruned.stderr).toBe(0);
    const survivors = ids.slice(2);
    expect(await cachedIds()).toEqual(survivors);

    // A backup pruned elsewhere (another machine's prune): its map goes the next time the cache is opened; nothing else does.
    const folder = dirname((await findFiles(cache, '.digests'))[0]!);
    const gone = '20200101T000000000Z-abcdef';
    await copyFile(join(folder, `${survivors[0]}.digests`), join(folder, `${gone}.digests`));
    await writeFile(join(folder, 'notes.txt'), 'not a map');
    const restored = await vhdvaultAsync('restore', root, 'vm', join(dir, 'again.raw'));
    expect(restored.code, restored.stderr).toBe(0);
    expect(await cachedIds()).toEqual(survivors);
    expect((await readdir(folder)).sort()).toEqual([...survivors.map((id) => `${id}.digests`), 'notes.txt'].sort());
  });
});

async function findFiles(root: string, suffix: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(root, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && entry.name.endsWith(suffix)) out.push(join(entry.parentPath, entry.name));
  }
  return out;
}
