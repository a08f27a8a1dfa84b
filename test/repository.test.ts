// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { copyFile, mkdir, open, readdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it, test } from 'vitest';
import { CLI, cliEnv, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { backupOf } from './helpers/store.js';
import { hasQemuImg, qemuImg, qemuInfo } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const dir = await tempDir();

/** Overwrite blocks of a raw image with random data (never past its end). */
async function changeBlocks(raw: string, blocks: number[]): Promise<void> {
  const fh = await open(raw, 'r+');
  const { size } = await fh.stat();
  for (const b of blocks) await fh.write(randomBytes(BLOCK), 0, Math.min(BLOCK, size - b * BLOCK), b * BLOCK);
  await fh.close();
}

function json<T>(args: string[]): T {
  const r = vhdvault(...args);
  expect(r.stderr, r.stderr).toBe('');
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as T;
}

interface ListRow {
  disk: string;
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
  createdAt: string;
  size: number;
  bytesStored: number;
}

for (const layout of ['dir', 'vhd'] as const) {
  describe.concurrent(`repository, layout ${layout}`, () => {
    // The two layouts side by side (their own repositories and files); each layout's tests in turn.
    const it = test.sequential;
    const repo = join(dir, `repo-${layout}`);
    const work = join(dir, `work-${layout}`);
    const disk = join(work, 'disk.raw');
    const SIZE = 40 * MiB + 1536; // 21 blocks, the last one partial
    const snapshots: Array<{ id: string; copy: string }> = [];

    it('init creates a repository and refuses a second init', async () => {
      await mkdir(work, { recursive: true });
      const extra = layout === 'dir' ? ['--compression', 'gzip'] : [];
      expect(vhdvault('init', repo, '--layout', layout, ...extra).code).toBe(0);
      const again = vhdvault('init', repo);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/already a vhdvault repository/);
    });

    it('takes a full backup and four deltas; each delta stores exactly the changed blocks', async () => {
      await makeRaw(disk, SIZE, [[0, 6 * MiB], [17 * MiB, MiB], [SIZE - 1536, 1536]]);
      const changes = [[], [1, 5], [20], [0, 7, 8, 9], [3]];
      for (let i = 0; i < changes.length; i++) {
        await changeBlocks(disk, changes[i]!);
        const report = json<{ id: string; kind: string; parent: string | null; blocksWritten: number; bytesWritten: number; durationMs: number; stages: Record<string, { bytesPerSecond: number; busyMs: number }>; boundingStage: string }>([
          'backup', repo, 'vm-1', '--source', disk, '--json', '--concurrency', '2',
        ]);
        expect(report.kind).toBe(i === 0 ? 'full' : 'delta');
        expect(report.parent).toBe(i === 0 ? null : snapshots[i - 1]!.id);
        // Full: only the blocks holding data (0-2, 8, 20); deltas: exactly what changed.
        expect(report.blocksWritten).toBe(i === 0 ? 5 : changes[i]!.length);
        expect(Object.keys(report.stages).sort()).toEqual(['compress', 'digest', 'read', 'write']);
        expect(['read', 'digest', 'compress', 'write']).toContain(report.boundingStage);
        const copy = join(work, `at-${i}.raw`);
        await copyFile(disk, copy);
        snapshots.push({ id: report.id, copy });
      }
      const rows = json<{ backups: ListRow[] }>(['list', repo, '--json']).backups;
      expect(rows.map((r) => r.id)).toEqual(snapshots.map((s) => s.id));
      expect(rows.map((r) => r.kind)).toEqual(['full', 'delta', 'delta', 'delta', 'delta']);
      for (const r of rows) {
        expect(r.disk).toBe('vm-1');
        expect(r.size).toBe(SIZE);
        expect(new Date(r.createdAt).toISOString()).toBe(r.createdAt);
        expect(r.bytesStored).toBeGreaterThan(0);
      }
    });

    it('every backup restores byte-identical to the disk at its time', async () => {
      // The restores only read the repository: side by side.
      const restored = await Promise.all(snapshots.map((s, i) => vhdvaultAsync('restore', repo, 'vm-1', join(work, `restored-${i}.raw`), '--backup', s.id)));
      for (const [i, s] of snapshots.entries()) {
        expect(restored[i]!.stderr).toBe('');
        expect(await sameBytes(join(work, `restored-${i}.raw`), s.copy), `backup ${i}`).toBe(true);
      }
    });

    test.skipIf(!hasQemuImg).sequential('restores the latest as a VHD that qemu-img reads exactly', async () => {
      const out = join(work, 'latest.vhd');
      expect(vhdvault('restore', repo, 'vm-1', out).code).toBe(0);
      expect(qemuInfo(out)['virtual-size']).toBe(SIZE);
      const back = join(work, 'latest-qemu.raw');
      qemuImg('convert', '-f', 'vpc', '-O', 'raw', out, back);
      expect(await sameBytes(back, snapshots.at(-1)!.copy)).toBe(true);
    });

    it('verify passes, then finds a flipped byte and names backup and block', async () => {
      expect(vhdvault('verify', repo).code).toBe(0);
      const target = snapshots[3]!; // a delta that stored blocks 0, 7, 8, 9
      const data = join(repo, 'disks', 'vm-1', `${target.id}.${layout === 'dir' ? 'vhd-dir' : 'vhd'}`);
      let restoreFlip: () => Promise<void>;
      if (layout === 'dir') {
        // gzip-compressed block file: flip a byte in the deflate stream's middle.
        const file = join(data, 'blocks', '0', '8');
        const original = await readFile(file);
        const flipped = Buffer.from(original);
        flipped[Math.floor(flipped.length / 2)] = flipped[Math.floor(flipped.length / 2)]! ^ 0x40;
        await writeFile(file, flipped);
        expect((await readFile(file)).equals(flipped)).toBe(true);
        restoreFlip = () => writeFile(file, original);
      } else {
        // The VHD's 4th stored block is block 9 (appended in order 0, 7, 8, 9): flip one data byte.
        const fh = await open(data, 'r+');
        const { size } = await fh.stat();
        const at = size - 512 - BLOCK + 12345;
        const b = Buffer.alloc(1);
        await fh.read(b, 0, 1, at);
        await fh.write(Buffer.from([b[0]! ^ 0x01]), 0, 1, at);
        await fh.close();
        restoreFlip = async () => {
          const h = await open(data, 'r+');
          await h.write(b, 0, 1, at);
          await h.close();
        };
      }
      const bad = vhdvault('verify', repo, 'vm-1');
      expect(bad.code, `verify of a flipped byte: ${bad.stdout}${bad.stderr}`).toBe(1);
      const block = layout === 'dir' ? 8 : 9;
      expect(bad.stderr).toContain(`backup ${target.id} block ${block}`);
      expect(bad.stderr.trim().split('\n')).toHaveLength(1);
      const j = JSON.parse(vhdvault('verify', repo, '--json').stdout);
      expect(j.ok).toBe(false);
      expect(j.problems).toEqual([expect.objectContaining({ disk: 'vm-1', id: target.id, block })]);
      // Restore of that backup fails naming the block rather than emitting wrong data.
      const out = join(work, 'should-not-exist.raw');
      const r = vhdvault('restore', repo, 'vm-1', out, '--backup', target.id);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`block ${block}`);
      expect(r.stderr).toContain(target.id);
      await expect(stat(out)).rejects.toThrow();
      await restoreFlip();
      expect(vhdvault('verify', repo).code).toBe(0);
    });

    it('verify checks what restore checks: sector bitmaps and the digests of blocks a delta does not store', async () => {
      const target = snapshots[1]!; // a delta that stored blocks 1 and 5
      const diskDir = join(repo, 'disks', 'vm-1');
      // A digest of a block the delta does not store (block 0) no longer matches the parent's.
      const digests = join(diskDir, `${target.id}.digests`);
      const original = await readFile(digests);
      const damaged = Buffer.from(original);
      damaged[3] = damaged[3]! ^ 0x10;
      await writeFile(digests, damaged);
      const bad = vhdvault('verify', repo, 'vm-1');
      expect(bad.code, `verify of a flipped byte: ${bad.stdout}${bad.stderr}`).toBe(1);
      expect(bad.stderr).toContain(`backup ${target.id} block 0`);
      expect(vhdvault('restore', repo, 'vm-1', join(work, 'no.raw'), '--backup', target.id).code).toBe(1);
      await writeFile(digests, original);
      if (layout === 'vhd') {
        // One sector bitmap bit cleared in the delta's first stored block (block 1, right after the metadata).
        const data = join(diskDir, `${target.id}.vhd`);
        const fh = await open(data, 'r+');
        const bat = Buffer.alloc(8);
        await fh.read(bat, 0, 8, 1536);
        const at = bat.readUInt32BE(4) * 512; // block 1's entry
        const bit = Buffer.alloc(1);
        await fh.read(bit, 0, 1, at);
        await fh.write(Buffer.from([bit[0]! & 0x7f]), 0, 1, at);
        const v = vhdvault('verify', repo, 'vm-1');
        expect(v.code).toBe(1);
        expect(v.stderr).toContain(`backup ${target.id} block 1`);
        await fh.write(bit, 0, 1, at);
        await fh.close();
      } else {
        // Without its digests file, the backup's blocks are still read: a missing one is still named.
        const block = join(diskDir, `${target.id}.vhd-dir`, 'blocks', '0', '5');
        await rename(block, `${block}.aside`);
        await writeFile(digests, original.subarray(0, 64));
        const v = vhdvault('verify', repo, 'vm-1');
        expect(v.code).toBe(1);
        expect(v.stderr).toMatch(/digests file has 64 bytes/);
        expect(v.stderr).toContain(`backup ${target.id} block 5`);
        await rename(`${block}.aside`, block);
        await writeFile(digests, original);
      }
      expect(vhdvault('verify', repo).code).toBe(0);
    });

    it('--changed reads only the listed blocks', async () => {
      await changeBlocks(disk, [4, 11]);
      const bitmap = Buffer.alloc(3);
      bitmap[0] = 0x80 >> 4; // block 4
      bitmap[1] = 0x80 >> 3; // block 11
      const bits = join(work, 'changed.bin');
      await writeFile(bits, bitmap);
      const report = json<{ id: string; blocksRead: number; blocksWritten: number }>(['backup', repo, 'vm-1', '--source', disk, '--changed', bits, '--json']);
      expect(report.blocksRead).toBe(2);
      expect(report.blocksWritten).toBe(2);
      const out = join(work, 'after-changed.raw');
      expect(vhdvault('restore', repo, 'vm-1', out, '--backup', report.id).code).toBe(0);
      expect(await sameBytes(out, disk)).toBe(true);
    });

    it('a block that became zero is stored, so the restore shows zeros', async () => {
      const fh = await open(disk, 'r+');
      await fh.write(Buffer.alloc(BLOCK), 0, BLOCK, 0);
      await fh.close();
      const report = json<{ id: string; blocksWritten: number }>(['backup', repo, 'vm-1', '--source', disk, '--json']);
      expect(report.blocksWritten).toBe(1);
      const out = join(work, 'zeroed.raw');
      expect(vhdvault('restore', repo, 'vm-1', out).code).toBe(0);
      expect(await sameBytes(out, disk)).toBe(true);
    });
  });
}

describe('repository rules', () => {
  const repo = join(dir, 'rules');
  const raw = join(dir, 'rules.raw');

  it('refuses a non-empty folder that is not a repository', async () => {
    const folder = join(dir, 'busy');
    await mkdir(folder);
    await writeFile(join(folder, 'precious.txt'), 'keep me');
    const r = vhdvault('init', folder);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not empty/);
    expect(await readdir(folder)).toEqual(['precious.txt']);
  });

  it('a refused init leaves the folder as it was', async () => {
    const folder = join(dir, 'refused');
    expect(vhdvault('init', folder, '--layout', 'vhd', '--compression', 'gzip').code).toBe(2);
    await expect(stat(folder)).rejects.toThrow();
    expect(vhdvault('init', folder, '--layout', 'vhd').code).toBe(0);
  });

  it('refuses disk names and ids that could escape the repository', async () => {
    expect(vhdvault('init', repo).code).toBe(0);
    await makeRaw(raw, 4 * MiB, [[0, 4096]]);
    // Each is refused before it touches anything: they run side by side.
    const names = ['..', '../x', 'a/b', '.hidden', 'a..b', 'x y'];
    const refused = await Promise.all(names.map((name) => vhdvaultAsync('backup', repo, name, '--source', raw)));
    for (const [i, name] of names.entries()) {
      const r = refused[i]!;
      expect(r.code, name).toBe(2);
      expect(r.stderr).toMatch(/invalid disk name/);
    }
    const r = vhdvault('restore', repo, 'vm', join(dir, 'x.raw'), '--backup', '../../etc');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/invalid backup id/);
    expect(await readdir(join(repo, 'disks')).catch(() => [])).toEqual([]);
  });

  it('one writer per disk: a live lock is refused clearly, a dead one is taken over', async () => {
    const diskDir = join(repo, 'disks', 'locked');
    await mkdir(diskDir, { recursive: true });
    // A live holder: this test process.
    await writeFile(join(diskDir, 'lock'), JSON.stringify({ pid: process.pid, host: (await import('node:os')).hostname(), startedAt: 'now', command: 'backup' }));
    const r = vhdvault('backup', repo, 'locked', '--source', raw);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/locked by process \d+/);
    // A dead holder: a process that has exited.
    const dead = spawn(process.execPath, ['-e', '0']);
    await new Promise((res) => dead.on('exit', res));
    await writeFile(join(diskDir, 'lock'), JSON.stringify({ pid: dead.pid, host: (await import('node:os')).hostname(), startedAt: 'then', command: 'backup' }));
    const ok = vhdvault('backup', repo, 'locked', '--source', raw);
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    expect(await readdir(diskDir)).not.toContain('lock');
  });

  it('a disk that does not exist is an error, not an empty all-clear', async () => {
    const runs = [['verify', repo, 'nosuch'], ['list', repo, 'nosuch'], ['prune', repo, 'nosuch', '--keep-last', '1']];
    const results = await Promise.all(runs.map((args) => vhdvaultAsync(...args)));
    for (const [i, args] of runs.entries()) {
      const r = results[i]!;
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(/has no backups of disk "nosuch"/);
    }
  });

  it('list without a disk is oldest first across disks', async () => {
    const small = join(dir, 'order.raw');
    await makeRaw(small, 4 * MiB, [[0, 4096]]);
    // Set-up in this process (the listing is what is checked): `vhdvault backup <repo> <d> --source <small> --full`.
    for (const d of ['zz', 'aa', 'zz']) await backupOf(repo, d, small, { full: true });
    const rows = json<{ backups: ListRow[] }>(['list', repo, '--json']).backups;
    const ids = rows.map((r) => r.id);
    expect(ids).toEqual([...ids].sort());
    expect(rows.filter((r) => r.disk === 'aa' || r.disk === 'zz').map((r) => r.disk)).toEqual(['zz', 'aa', 'zz']);
  });

  it('stale locks: a reused pid or an unreadable old lock does not block forever', async () => {
    const diskDir = join(repo, 'disks', 'stale');
    await mkdir(diskDir, { recursive: true });
    const small = join(dir, 'stale.raw');
    await makeRaw(small, 4 * MiB, [[0, 4096]]);
    const host = (await import('node:os')).hostname();
    // pid 1 is alive, but it is not the process that took this lock (its start time differs).
    await writeFile(join(diskDir, 'lock'), JSON.stringify({ pid: 1, host, startedAt: 'then', command: 'backup', processStart: '1' }));
    let r = vhdvault('backup', repo, 'stale', '--source', small);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    // Garbage left by a power loss: stale once old.
    await writeFile(join(diskDir, 'lock'), 'garb');
    const { utimes } = await import('node:fs/promises');
    await utimes(join(diskDir, 'lock'), new Date(Date.now() - 60_000), new Date(Date.now() - 60_000));
    r = vhdvault('backup', repo, 'stale', '--source', small);
    expect(r.code, r.stderr).toBe(0);
    expect(await readdir(diskDir)).not.toContain('lock');
  });

  it('stale lock taken over by several writers at once: exactly one wins', async () => {
    const diskDir = join(repo, 'disks', 'race');
    await mkdir(diskDir, { recursive: true });
    const small = join(dir, 'race.raw');
    await makeRaw(small, 8 * MiB, [[0, 8 * MiB]]);
    const host = (await import('node:os')).hostname();
    const dead = spawn(process.execPath, ['-e', '0']);
    await new Promise((res) => dead.on('exit', res));
    for (let round = 0; round < 4; round++) {
      await writeFile(join(diskDir, 'lock'), JSON.stringify({ pid: dead.pid, host, startedAt: 'then', command: 'backup' }));
      const runs = [0, 1, 2].map(
        () =>
          new Promise<number>((res) => {
            const c = spawn(process.execPath, [CLI, 'backup', repo, 'race', '--source', small, '--max-read', '4M'], { stdio: 'ignore', env: cliEnv() });
            c.on('exit', (code) => res(code ?? -1));
          }),
      );
      const codes = await Promise.all(runs);
      expect(codes.filter((c) => c === 0), `round ${round}: ${codes}`).toHaveLength(1);
    }
    // The chain stayed a chain: every backup's parent is the one before it.
    const rows = json<{ backups: ListRow[] }>(['list', repo, 'race', '--json']).backups;
    rows.slice(1).forEach((row, i) => expect(row.parent).toBe(rows[i]!.id));
  });

  // The two rate tests mostly wait on their limits, on disks of their own: they run side by side.
  it.concurrent('--max-write holds the write rate in the dir layout (blocks are not written ahead of it)', async () => {
    const big = join(dir, 'wrate.raw');
    await makeRaw(big, 24 * MiB, [[0, 24 * MiB]]);
    const diskDir = join(repo, 'disks', 'wrate');
    const started = performance.now();
    const child = spawn(process.execPath, [CLI, 'backup', repo, 'wrate', '--source', big, '--max-write', '6M'], { stdio: 'ignore', env: cliEnv() });
    const exited = new Promise<number>((res) => child.on('exit', (code) => res(code ?? -1)));
    // Once the backup has begun (its start is slow on a loaded machine), let it write for a while.
    for (let i = 0; i < 600 && !existsSync(diskDir); i++) await new Promise((res) => setTimeout(res, 50));
    await new Promise((res) => setTimeout(res, 1500));
    const { execFileSync } = await import('node:child_process');
    const midway = Number(execFileSync('du', ['-sb', diskDir], { encoding: 'utf8' }).split('\t')[0]);
    const elapsed = (performance.now() - started) / 1000;
    // At most the rate times the elapsed time, plus a block of burst and one in flight.
    expect(midway).toBeLessThan(elapsed * 6 * MiB + 3 * BLOCK);
    expect(await exited).toBe(0);
    expect((performance.now() - started) / 1000).toBeGreaterThan(3.5);
  });

  it.concurrent('--max-read holds the read rate', async () => {
    const big = join(dir, 'rate.raw');
    await makeRaw(big, 24 * MiB, [[0, 24 * MiB]]);
    const started = performance.now();
    const r = await vhdvaultAsync('backup', repo, 'rate', '--source', big, '--max-read', '12M', '--json');
    const seconds = (performance.now() - started) / 1000;
    expect(r.code).toBe(0);
    // 24 MiB at 12 MiB/s: at least ~1.9 s (one block of burst allowed).
    expect(seconds).toBeGreaterThan(1.7);
  });

  it('usage errors exit 2', async () => {
    const [noSource, concurrency, rate, layout] = await Promise.all([
      vhdvaultAsync('backup', repo, 'vm'), // --source missing
      vhdvaultAsync('backup', repo, 'vm', '--source', raw, '--concurrency', '0'),
      vhdvaultAsync('backup', repo, 'vm', '--source', raw, '--max-read', 'fast'),
      vhdvaultAsync('init', join(dir, 'r2'), '--layout', 'zip'),
    ]);
    expect(noSource!.code).toBe(2);
    expect(concurrency!.code).toBe(2);
    expect(rate!.code).toBe(2);
    expect(layout!.code).toBe(2);
  });

  it('a missing repository is one clear line, exit 1', () => {
    const r = vhdvault('list', join(dir, 'nowhere'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not a vhdvault repository/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });
});

export { CLI };
