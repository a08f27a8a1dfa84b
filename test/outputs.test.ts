/**
 * Output targets of `restore` and `vhd convert`, as qemu-img convert and dd
 * treat them: block and character devices written in place (raw, zeros
 * included), `-` for standard output, symlinks followed, and outputs that would
 * destroy what is being read (the repository, the input and its parents)
 * refused before anything is written.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readdir, readFile, readlink, stat, symlink, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvault, type CliResult } from './helpers/cli.js';
import { sha256, tempDir } from './helpers/files.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
/** 5 blocks: data, zeros, data, zeros, and a half block of data (the size is not a block multiple). */
const SIZE = 4 * BLOCK + MiB;

const dir = await tempDir('vhdvault-outputs-');
const repo = join(dir, 'repo');
const rawPath = join(dir, 'disk.raw');
let content: Buffer;

beforeAll(async () => {
  content = Buffer.alloc(SIZE);
  randomBytes(BLOCK).copy(content, 0);
  randomBytes(BLOCK).copy(content, 2 * BLOCK);
  randomBytes(MiB).copy(content, 4 * BLOCK);
  await writeFile(rawPath, content);
  ok(vhdvault('init', repo));
  ok(vhdvault('backup', repo, 'vm', '--source', rawPath));
  ok(vhdvault('vhd', 'convert', rawPath, join(dir, 'disk.vhd')));
});

function ok(r: CliResult): CliResult {
  expect(r.code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
  return r;
}

/** The CLI with stdout kept as bytes. */
function vhdvaultBytes(...args: string[]): { code: number; stdout: Buffer; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { maxBuffer: 256 * MiB, env: cliEnv() });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr.toString('utf8') };
}

/** Exit `code`, nothing on stdout, one line on stderr naming `name` and matching `problem`, no stack. */
function refused(r: { code: number; stdout: string | Buffer; stderr: string }, code: number, name: string, problem: RegExp): void {
  const context = `exit ${r.code}\nstderr: ${r.stderr}`;
  expect(r.code, context).toBe(code);
  expect(r.stdout.length, context).toBe(0);
  expect(r.stderr, context).not.toContain('    at ');
  expect(r.stderr.trimEnd().split('\n'), context).toHaveLength(1);
  expect(r.stderr, context).toContain(name);
  expect(r.stderr, context).toMatch(problem);
}

async function listing(path: string): Promise<string[]> {
  return (await readdir(path, { recursive: true })).sort();
}

describe('standard output (-)', () => {
  it('restore writes the raw disk, zeros included, and nothing else', () => {
    const r = vhdvaultBytes('restore', repo, 'vm', '-');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.length).toBe(SIZE);
    expect(r.stdout.equals(content)).toBe(true);
    expect(r.stderr).toMatch(/restored vm backup .* to - \(raw/);
  });

  it('restore --format vhd writes the synthesized VHD, which reads back as the disk', async () => {
    const r = vhdvaultBytes('restore', repo, 'vm', '-', '--format', 'vhd');
    expect(r.code, r.stderr).toBe(0);
    const vhd = join(dir, 'from-stdout.vhd');
    await writeFile(vhd, r.stdout);
    ok(vhdvault('vhd', 'check', vhd));
    ok(vhdvault('vhd', 'convert', vhd, join(dir, 'from-stdout.raw')));
    expect((await readFile(join(dir, 'from-stdout.raw'))).equals(content)).toBe(true);
  });

  it('vhd convert writes raw (default), fixed and dynamic VHD streams', async () => {
    const raw = vhdvaultBytes('vhd', 'convert', join(dir, 'disk.vhd'), '-');
    expect(raw.code, raw.stderr).toBe(0);
    expect(raw.stderr).toBe('');
    expect(raw.stdout.equals(content)).toBe(true);

    const fixed = vhdvaultBytes('vhd', 'convert', join(dir, 'disk.vhd'), '-', '--format', 'fixed');
    expect(fixed.code, fixed.stderr).toBe(0);
    expect(fixed.stdout.length).toBe(SIZE + 512);
    expect(fixed.stdout.subarray(0, SIZE).equals(content)).toBe(true);

    // From a raw input too: the blocks holding data are found first, then streamed.
    for (const input of [rawPath, join(dir, 'disk.vhd')]) {
      const dynamic = vhdvaultBytes('vhd', 'convert', input, '-', '--format', 'vhd');
      expect(dynamic.code, dynamic.stderr).toBe(0);
      const vhd = join(dir, 'stream.vhd');
      await writeFile(vhd, dynamic.stdout);
      const info = JSON.parse(ok(vhdvault('vhd', 'info', vhd, '--json')).stdout) as { type: string; allocatedBlocks: number };
      expect(info.type).toBe('dynamic');
      expect(info.allocatedBlocks).toBe(3);
      ok(vhdvault('vhd', 'convert', vhd, join(dir, 'stream.raw')));
      expect((await readFile(join(dir, 'stream.raw'))).equals(content)).toBe(true);
    }
  });

  it('a directory cannot go to standard output (usage error)', () => {
    refused(vhdvaultBytes('vhd', 'convert', rawPath, '-', '--format', 'dir'), 2, 'standard output', /directory/);
  });

  it('a reader that goes away (| head -c 1) ends it with one line, exit 1', async () => {
    for (const args of [['restore', repo, 'vm', '-'], ['restore', repo, 'vm', '-', '--format', 'vhd'], ['vhd', 'convert', rawPath, '-']]) {
      const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.stdout.once('data', () => child.stdout.destroy());
      const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
      expect(code, stderr).toBe(1);
      expect(stderr).not.toContain('    at ');
      expect(stderr.trimEnd().split('\n'), stderr).toHaveLength(1);
      expect(stderr).toMatch(/^vhdvault: standard output: .*broken pipe/);
    }
  });
});

describe('character devices', () => {
  it('restore and convert write /dev/null in place: it stays a character device', async () => {
    ok(vhdvault('restore', repo, 'vm', '/dev/null'));
    ok(vhdvault('vhd', 'convert', join(dir, 'disk.vhd'), '/dev/null'));
    const link = join(dir, 'null-link');
    await symlink('/dev/null', link);
    ok(vhdvault('restore', repo, 'vm', link));
    expect((await stat('/dev/null')).isCharacterDevice()).toBe(true);
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect(await readdir('/dev')).not.toContainEqual(expect.stringMatching(/^\.null\..*\.tmp$/));
  });

  it('a VHD format to a device is a usage error', async () => {
    refused(vhdvault('restore', repo, 'vm', '/dev/null', '--format', 'vhd'), 2, '/dev/null', /only the raw format/);
    refused(vhdvault('vhd', 'convert', rawPath, '/dev/null', '--format', 'fixed'), 2, '/dev/null', /only the raw format/);
    expect((await stat('/dev/null')).isCharacterDevice()).toBe(true);
  });
});

/** A loop device over a file of `size` random bytes, or null where loop devices are unavailable. */
function attachLoop(file: string, size: number): string | null {
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, `bs=${MiB}`, `count=${size / MiB}`, 'status=none']);
  try {
    return execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim() || null;
  } catch {
    return null;
  }
}

describe('block devices', () => {
  const loops: string[] = [];
  let big: string | null = null;
  let small: string | null = null;
  beforeAll(() => {
    big = attachLoop(join(dir, 'big.img'), 16 * MiB);
    small = big ? attachLoop(join(dir, 'small.img'), 8 * MiB) : null;
    for (const d of [big, small]) if (d) loops.push(d);
  });
  afterAll(() => {
    for (const d of loops) spawnSync('losetup', ['-d', d]);
  });

  async function deviceBytes(device: string, length: number, at = 0): Promise<Buffer> {
    const fh = await open(device, 'r');
    try {
      const buf = Buffer.alloc(length);
      await fh.read(buf, 0, length, at);
      return buf;
    } finally {
      await fh.close();
    }
  }

  it('restore writes the disk in place, zero blocks as zeros, and leaves the rest of the device', async (ctx) => {
    if (!big) return ctx.skip();
    const tailBefore = await deviceBytes(big, 16 * MiB - SIZE, SIZE);
    ok(vhdvault('restore', repo, 'vm', big));
    expect((await stat(big)).isBlockDevice()).toBe(true);
    // The device held random bytes: the disk's zero blocks must have been written over.
    expect((await deviceBytes(big, SIZE)).equals(content)).toBe(true);
    expect((await deviceBytes(big, 16 * MiB - SIZE, SIZE)).equals(tailBefore)).toBe(true);
  });

  it('convert writes a device in place too, through a symlink, and a device reads back as a raw input', async (ctx) => {
    if (!big) return ctx.skip();
    const link = join(dir, 'lv-link');
    await symlink(big, link);
    execFileSync('dd', ['if=/dev/urandom', `of=${big}`, `bs=${MiB}`, `count=${SIZE / MiB}`, 'status=none', 'conv=fsync']);
    ok(vhdvault('vhd', 'convert', join(dir, 'disk.vhd'), link));
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect((await deviceBytes(big, SIZE)).equals(content)).toBe(true);
    // As an input a block device is read at its full size (fstat says 0 bytes).
    const back = join(dir, 'from-device.raw');
    ok(vhdvault('vhd', 'convert', big, back));
    expect((await stat(back)).size).toBe(16 * MiB);
    expect((await readFile(back)).subarray(0, SIZE).equals(content)).toBe(true);
  });

  it('a device smaller than the disk is refused before anything is written', async (ctx) => {
    if (!small) return ctx.skip();
    const before = await deviceBytes(small, 8 * MiB);
    refused(vhdvault('restore', repo, 'vm', small), 1, small, /smaller than/);
    refused(vhdvault('vhd', 'convert', rawPath, small), 1, small, /smaller than/);
    expect((await deviceBytes(small, 8 * MiB)).equals(before)).toBe(true);
  });

  it('a VHD format to a block device is a usage error, and a device is not its own output', async (ctx) => {
    if (!big) return ctx.skip();
    refused(vhdvault('restore', repo, 'vm', big, '--format', 'vhd'), 2, big, /only the raw format/);
    refused(vhdvault('vhd', 'convert', big, big), 1, big, /is the input/);
  });
});

describe('symlinks and regular files', () => {
  it('a symlink to a regular file: the file is replaced, the link stays a link', async () => {
    const target = join(dir, 'target.raw');
    await writeFile(target, 'old content');
    const link = join(dir, 'link.raw');
    await symlink('target.raw', link);
    ok(vhdvault('restore', repo, 'vm', link));
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect(await readlink(link)).toBe('target.raw');
    expect((await readFile(target)).equals(content)).toBe(true);

    await writeFile(target, 'old content');
    ok(vhdvault('vhd', 'convert', join(dir, 'disk.vhd'), link));
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect((await readFile(target)).equals(content)).toBe(true);
  });

  it('a dangling symlink: its target is created', async () => {
    const link = join(dir, 'dangling.vhd');
    await symlink('made-by-restore.vhd', link);
    ok(vhdvault('restore', repo, 'vm', link));
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    ok(vhdvault('vhd', 'check', join(dir, 'made-by-restore.vhd')));
  });

  it('a regular file is replaced atomically, nothing left beside it', async () => {
    const sub = join(dir, 'plain');
    await mkdir(sub);
    await writeFile(join(sub, 'out.raw'), 'old');
    ok(vhdvault('restore', repo, 'vm', join(sub, 'out.raw')));
    expect((await readFile(join(sub, 'out.raw'))).equals(content)).toBe(true);
    expect(await readdir(sub)).toEqual(['out.raw']);
  });
});

describe('outputs that would destroy what is read are refused', () => {
  it('restore into the repository, however it is spelt, changes nothing there', async () => {
    const before = await listing(repo);
    const diskDir = join(repo, 'disks', 'vm');
    const outside = join(dir, 'outside');
    await mkdir(outside);
    await symlink(diskDir, join(outside, 'into-repo'));
    await symlink(join(diskDir, 'new.raw'), join(outside, 'dangling-into-repo.raw'));
    const configBefore = await sha256(join(repo, 'vhdvault.json'));
    const cases = [
      join(diskDir, 'new.raw'), // a new name inside
      join(repo, 'vhdvault.json'), // an existing file inside
      `${outside}/../repo/disks/x.vhd`, // `..`
      relative(process.cwd(), join(repo, 'y.raw')), // relative
      join(outside, 'into-repo', 'z.raw'), // a folder symlinked into it
      join(outside, 'dangling-into-repo.raw'), // a dangling link pointing into it
      repo, // the repository itself
    ];
    for (const out of cases) refused(vhdvault('restore', repo, 'vm', out), 1, out, /repository/);
    expect(await listing(repo)).toEqual(before);
    expect(await sha256(join(repo, 'vhdvault.json'))).toBe(configBefore);
    expect(ok(vhdvault('verify', repo)).stdout).toMatch(/^ok: 1 backup,/);
  });

  it('vhd convert refuses its input and the files of its chain, through symlinks and inside directories', async () => {
    const sub = join(dir, 'chain');
    await mkdir(sub);
    const base = join(sub, 'base.vhd-dir');
    const child = join(sub, 'child.vhd');
    ok(vhdvault('vhd', 'convert', rawPath, base));
    ok(vhdvault('vhd', 'create', child, '--parent', base));
    await symlink(child, join(sub, 'child-link.raw'));
    const before = await listing(sub);
    const childSum = await sha256(child);
    refused(vhdvault('vhd', 'convert', child, child, '--format', 'vhd'), 1, child, /is the input/);
    refused(vhdvault('vhd', 'convert', child, join(sub, 'child-link.raw')), 1, 'child-link.raw', /is the input/);
    refused(vhdvault('vhd', 'convert', child, base, '--format', 'dir'), 1, base, /a parent of the input/);
    refused(vhdvault('vhd', 'convert', child, join(base, 'footer'), '--format', 'raw'), 1, join(base, 'footer'), /inside .*a parent of the input/);
    refused(vhdvault('vhd', 'convert', rawPath, rawPath, '--format', 'raw'), 1, rawPath, /is the input/);
    expect(await listing(sub)).toEqual(before);
    expect(await sha256(child)).toBe(childSum);
    ok(vhdvault('vhd', 'check', child));
  });
});
