/**
 * Xen Orchestra aliases: `*.alias.vhd` text files holding a path, relative to
 * the alias's folder, to the real VHD (a directory under `data/`); a child
 * names its parent by the parent's alias. The remote is built with our own
 * CLI: base and child as VHD directories, the child created over the base's alias.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { expectRefused, vhdvault, type CliResult } from './helpers/cli.js';
import { sha256, tempDir } from './helpers/files.js';
import { openDisk } from '../src/vhd/openDisk.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 4 * BLOCK;

const root = await tempDir('vhdvault-alias-');
/** One VDI's folder of an XO remote. */
let vdi = join(root, 'remote', 'vdi');
let expected: Buffer;

function ok(r: CliResult): CliResult {
  expect(r.code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
  return r;
}

const refused = expectRefused;

/** A differencing directory over `parentAlias`, created at `createdAt` and moved to `data/<name>`, with block 1 rewritten. */
async function makeChild(createdAt: string, name: string, parentAlias: string, block1: Buffer): Promise<void> {
  ok(vhdvault('vhd', 'create', createdAt, '--parent', parentAlias));
  const child = await openDisk(createdAt, { writable: true });
  await child.writeBlock(1, block1);
  await child.close();
  await rename(createdAt, join(vdi, 'data', name));
  await writeFile(join(vdi, name.replace(/\.vhd$/, '.alias.vhd')), `data/${name}\n`);
}

beforeAll(async () => {
  await mkdir(join(vdi, 'data'), { recursive: true });
  const base = Buffer.alloc(SIZE);
  randomBytes(BLOCK).copy(base, 0);
  randomBytes(BLOCK).copy(base, 2 * BLOCK);
  const baseRaw = join(root, 'base.raw');
  await writeFile(baseRaw, base);
  // XO names its data directories *.vhd: --format dir makes one under that name.
  ok(vhdvault('vhd', 'convert', baseRaw, join(vdi, 'data', 'base.vhd'), '--format', 'dir'));
  await writeFile(join(vdi, 'base.alias.vhd'), 'data/base.vhd\n');

  const block1 = randomBytes(BLOCK);
  expected = Buffer.from(base);
  block1.copy(expected, BLOCK);
  // Child 1 records the alias relative to its own folder (data/ → ../base.alias.vhd).
  await makeChild(join(vdi, 'data', 'child.vhd-dir'), 'child.vhd', join(vdi, 'base.alias.vhd'), block1);
  // Child 2 records it as XO does, relative to the folder of the aliases (base.alias.vhd).
  await makeChild(join(vdi, 'child2.vhd-dir'), 'child2.vhd', join(vdi, 'base.alias.vhd'), block1);
});

describe('reading through aliases', () => {
  it('vhd info describes the VHD an alias points to, and its chain through the parent\'s alias', () => {
    const alias = join(vdi, 'child.alias.vhd');
    const info = JSON.parse(ok(vhdvault('vhd', 'info', alias, '--json')).stdout) as {
      path: string;
      aliasTarget: string;
      type: string;
      storage: string;
      allocatedBlocks: number;
      chain: Array<{ path: string; type: string }>;
    };
    expect(info.path).toBe(alias);
    expect(info.aliasTarget).toBe(join(vdi, 'data', 'child.vhd'));
    expect(info).toMatchObject({ type: 'differencing', storage: 'directory', allocatedBlocks: 1 });
    expect(info.chain.map((m) => m.type)).toEqual(['differencing', 'dynamic']);
    expect(info.chain[1]!.path).toBe(join(vdi, 'data', 'base.vhd'));
    expect(ok(vhdvault('vhd', 'info', alias)).stdout).toContain(`alias of:         ${join(vdi, 'data', 'child.vhd')}`);
  });

  it('vhd check and vhd convert follow the aliases', async () => {
    for (const child of ['child', 'child2']) {
      const alias = join(vdi, `${child}.alias.vhd`);
      expect(ok(vhdvault('vhd', 'check', alias)).stdout).toMatch(/ok \(differencing, \d+ bytes, chain of 2 disks\)/);
      const out = join(root, `${child}.raw`);
      ok(vhdvault('vhd', 'convert', alias, out));
      expect((await readFile(out)).equals(expected)).toBe(true);
    }
    ok(vhdvault('vhd', 'check', join(vdi, 'base.alias.vhd')));
  });

  it('an alias can be a backup source', async () => {
    const repo = join(root, 'repo');
    ok(vhdvault('init', repo));
    ok(vhdvault('backup', repo, 'vm', '--source', join(vdi, 'child.alias.vhd')));
    const out = join(root, 'restored.raw');
    ok(vhdvault('restore', repo, 'vm', out));
    expect((await readFile(out)).equals(expected)).toBe(true);
  });

  it('convert refuses to write over a parent\'s alias or its data', async () => {
    const alias = join(vdi, 'base.alias.vhd');
    const before = await sha256(alias);
    refused(vhdvault('vhd', 'convert', join(vdi, 'child.alias.vhd'), alias, '--format', 'raw'), alias, /a parent of the input/);
    refused(vhdvault('vhd', 'convert', join(vdi, 'child.alias.vhd'), join(vdi, 'child.alias.vhd'), '--format', 'raw'), 'child.alias.vhd', /is the input/);
    expect(await sha256(alias)).toBe(before);
    ok(vhdvault('vhd', 'check', join(vdi, 'child.alias.vhd')));
  });

  it('after the remote moves, a child reached through its alias finds its parent relative to the alias\'s folder', async () => {
    const moved = join(root, 'moved-remote');
    await rename(join(root, 'remote'), moved);
    vdi = join(moved, 'vdi');
    // Child 2's locators: relative to data/ (wrong folder) and absolute (stale). Its alias's folder is right.
    ok(vhdvault('vhd', 'check', join(vdi, 'child2.alias.vhd')));
    refused(vhdvault('vhd', 'check', join(vdi, 'data', 'child2.vhd')), 'child2.vhd', /parent disk not found/);
    // Child 1 names ../base.alias.vhd from data/: still right.
    ok(vhdvault('vhd', 'check', join(vdi, 'child.alias.vhd')));
  });
});

describe('aliases that are refused', () => {
  const cases: Array<{ name: string; content: string | Buffer; problem: RegExp }> = [
    { name: 'chained', content: 'base.alias.vhd\n', problem: /another alias.*cannot be chained/ },
    { name: 'escaping', content: '../elsewhere/data/base.vhd\n', problem: /outside its folder/ },
    { name: 'climbing', content: 'data/../../vdi/data/base.vhd\n', problem: /outside its folder/ },
    { name: 'itself', content: '.\n', problem: /outside its folder/ },
    { name: 'absolute', content: '/etc/passwd\n', problem: /absolute path/ },
    { name: 'big', content: `data/base.vhd${' '.repeat(5000)}\n`, problem: /too large for an alias file/ },
    { name: 'binary', content: Buffer.from([0x64, 0xff, 0xfe, 0x00, 0x80]), problem: /not UTF-8 text/ },
    { name: 'two-lines', content: 'data/base.vhd\ndata/child.vhd\n', problem: /one line/ },
    { name: 'empty', content: '\n', problem: /empty alias/ },
    { name: 'missing', content: 'data/gone.vhd\n', problem: /points to data\/gone\.vhd: no such file/ },
  ];

  beforeAll(async () => {
    await mkdir(join(root, 'elsewhere', 'data'), { recursive: true });
    ok(vhdvault('vhd', 'create', join(root, 'elsewhere', 'data', 'base.vhd'), '--size', '4M'));
  });

  for (const c of cases) {
    it(`${c.name}: info, check and convert exit 1 with one line naming the alias`, async () => {
      const alias = join(vdi, `${c.name}.alias.vhd`);
      await writeFile(alias, c.content);
      refused(vhdvault('vhd', 'info', alias), alias, c.problem);
      refused(vhdvault('vhd', 'check', alias), alias, c.problem);
      const out = join(root, `${c.name}.raw`);
      refused(vhdvault('vhd', 'convert', alias, out), alias, c.problem);
      await expect(readFile(out)).rejects.toThrow();
    });
  }

  it('a parent alias that leaves the remote is not followed: the child fails naming it', async () => {
    const alias = join(vdi, 'base.alias.vhd');
    const original = await readFile(alias);
    await writeFile(alias, '../../elsewhere/data/base.vhd\n');
    try {
      refused(vhdvault('vhd', 'check', join(vdi, 'child2.alias.vhd')), alias, /outside its folder.*\(parent of /);
    } finally {
      await writeFile(alias, original);
    }
    ok(vhdvault('vhd', 'check', join(vdi, 'child2.alias.vhd')));
  });
});
