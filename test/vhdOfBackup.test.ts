/**
 * `vhd info|check|convert` given a backup as `<repo>/disks/<disk>/<id>` (or its
 * .json): every layout of a local repository, read as restore reads it
 * (issue 20). A metadata file is never read as a raw disk, and another
 * format's image is named as such.
 */
import { execFileSync } from 'node:child_process';
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { LayoutName } from '../src/store/metadata.js';
import { expectRefused, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { backupOf, initRepo } from './helpers/store.js';

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-vhdbackup-');
const base = join(dir, 'base.raw');
const changed = join(dir, 'changed.raw');

beforeAll(async () => {
  await makeRaw(base, 12 * MiB, [[0, MiB], [5 * MiB, 3 * MiB]]);
  await copyFile(base, changed);
  execFileSync('dd', ['if=/dev/urandom', `of=${changed}`, 'bs=1M', 'seek=9', 'count=2', 'conv=notrunc', 'status=none']);
});

const ok = async (...args: string[]) => {
  const r = await vhdvaultAsync(...args);
  expect(r.code, r.stderr).toBe(0);
  return r.stdout;
};

describe.each<LayoutName>(['dir', 'vhd', 'objects'])('a backup of a %s repository named by its path', (layout) => {
  const repo = join(dir, layout);
  let delta: string;
  let named: string;

  beforeAll(async () => {
    await initRepo(repo, layout);
    await backupOf(repo, 'vm', base);
    delta = await backupOf(repo, 'vm', changed);
    named = join(repo, 'disks', 'vm', delta);
  });

  it('vhd convert gives what restore gives, byte for byte, from <id> and from <id>.json', async () => {
    const restored = join(dir, `${layout}-restored.raw`);
    await ok('restore', repo, 'vm', restored, '--backup', delta);
    for (const input of [named, `${named}.json`]) {
      const out = join(dir, `${layout}-converted.raw`);
      await ok('vhd', 'convert', input, out);
      expect((await readFile(out)).equals(await readFile(restored)), input).toBe(true);
    }
    expect((await readFile(restored)).equals(await readFile(changed))).toBe(true);
  });

  it('vhd info describes it and vhd check reads it whole', async () => {
    const info = JSON.parse(await ok('vhd', 'info', named, '--json')) as { path: string; size: number; uuid: string; chain: unknown[] };
    expect(info).toMatchObject({ path: named, size: 12 * MiB });
    expect(info.chain.length).toBe(layout === 'objects' ? 1 : 2);
    expect(await ok('vhd', 'check', `${named}.json`)).toMatch(new RegExp(`^${named}\\.json: ok \\(\\w+, ${12 * MiB} bytes`));
  });
});

describe('what the vhd tools never read as a disk', () => {
  it('a metadata file taken out of its repository is refused by name, not converted as raw bytes', async () => {
    const repo = join(dir, 'dir');
    const [id] = (await ok('list', repo, 'vm', '--json')).match(/\d{8}T\d{9}Z-[0-9a-f]{6}/)!;
    const loose = join(dir, `${id}.json`);
    await copyFile(join(repo, 'disks', 'vm', `${id}.json`), loose);
    const out = join(dir, 'loose.raw');
    expectRefused(await vhdvaultAsync('vhd', 'convert', loose, out), loose, /is a JSON file, not a disk image: a backup is given as <repo>\/disks\/<disk>\/<id>/);
    expectRefused(await vhdvaultAsync('vhd', 'convert', loose, out, '--from', 'raw'), loose, /is a JSON file/);
  });

  it('an s3:// path that names no backup is a usage error for vhd info, check and convert', async () => {
    const path = 's3://bucket/prefix/disks/vm/not-an-id';
    for (const args of [['info', path], ['check', path], ['convert', path, join(dir, 'none.raw')]]) {
      const r = await vhdvaultAsync('vhd', ...args);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toBe(`vhdvault: ${path}: names no backup; the vhd tools read a backup of an object store as s3://bucket/prefix/disks/<disk>/<id>\n`);
    }
  });

  it('a qcow2 image is named as one by vhd info, check and convert', async () => {
    const image = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    for (const args of [['info', image], ['check', image], ['convert', image, join(dir, 'out.vhd')]]) {
      expectRefused(await vhdvaultAsync('vhd', ...args), image, /is a qcow2 image, not a raw disk or VHD/);
    }
  });
});
