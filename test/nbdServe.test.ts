// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * `vhdvault serve` against real NBD clients: qemu-img, nbdcopy, nbdinfo and
 * qemu-io read (and, with --writable, write) through our server exactly what
 * the backups hold, and the backups never change.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, open, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { exportUri, startServe } from './helpers/serve.js';
import { backupOf, initRepo } from './helpers/store.js';
import type { Compression } from '../src/vhd/compression.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 12 * MiB;
const dir = await tempDir();

/** Three backups of a 12 MiB disk whose blocks 4 and 5 are never written (holes); block i changes before backup i. */
async function chain(name: string, layout: 'dir' | 'vhd', compression: Compression = 'none') {
  const repo = join(dir, name);
  await initRepo(repo, layout, compression);
  const disk = join(dir, `${name}.raw`);
  await makeRaw(disk, SIZE, [[0, 8 * MiB], [10 * MiB + 4096, 64 * 1024]]);
  const content = new Map<string, string>();
  for (let i = 0; i < 3; i++) {
    if (i > 0) {
      const fh = await open(disk, 'r+');
      await fh.write(randomBytes(BLOCK / 2), 0, BLOCK / 2, i * BLOCK + 123 * 512);
      await fh.close();
    }
    content.set(await backupOf(repo, 'vm', disk), await sha256(disk));
  }
  return { repo, disk, content, ids: [...content.keys()] };
}

async function nbdinfo(...args: string[]): Promise<string> {
  return (await run('nbdinfo', args)).stdout;
}

describe('real clients read through vhdvault serve', () => {
  for (const [layout, compression] of [['dir', 'none'], ['dir', 'gzip'], ['vhd', 'none']] as const) {
    it(`qemu-img and nbdcopy get each backup's exact content (layout ${layout}, compression ${compression})`, async () => {
      const c = await chain(`${layout}-${compression}`, layout, compression);
      const socket = join(dir, `${layout}-${compression}.sock`);
      const serving = await startServe(c.repo, 'vm', '--socket', socket);
      try {
        expect(serving.ready.backup).toBe(c.ids.at(-1));
        await Promise.all(
          c.ids.map(async (id, i) => {
            const out = join(dir, `${layout}-${compression}-${id}.raw`);
            const uri = exportUri(serving, `vm@${id}`);
            if (i % 2 === 0) await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
            else await run('nbdcopy', [uri, out]);
            expect(await sha256(out), `backup ${id} through NBD`).toBe(c.content.get(id));
          }),
        );
        const latest = join(dir, `${layout}-${compression}-latest.raw`);
        await run('nbdcopy', [serving.uri, latest]);
        expect(await sha256(latest)).toBe(c.content.get(c.ids.at(-1)!));
      } finally {
        expect(await serving.stop()).toBe(0);
      }
      expect(serving.stderr()).toBe('vhdvault: stopped\n');
      expect((await vhdvaultAsync('verify', c.repo)).code).toBe(0);
    });
  }

  for (const layout of ['objects', 'dir', 'vhd'] as const) {
    it(`a block read again once the cache let it go is read in place, exact (layout ${layout})`, async () => {
      // 40 MiB: 20 blocks a backup, more than the server's 16 cached blocks.
      const repo = join(dir, `again-${layout}`);
      await initRepo(repo, layout);
      const disk = join(dir, `again-${layout}.raw`);
      await makeRaw(disk, 40 * MiB, [[0, 40 * MiB]]);
      const first = await backupOf(repo, 'vm', disk);
      const firstSha = await sha256(disk);
      const fh = await open(disk, 'r+');
      await fh.write(randomBytes(3 * BLOCK), 0, 3 * BLOCK, 5 * BLOCK + 4096);
      await fh.close();
      const second = await backupOf(repo, 'vm', disk);
      const socket = join(dir, `again-${layout}.sock`);
      const serving = await startServe(repo, 'vm', '--socket', socket);
      try {
        const copy = async (id: string, name: string) => {
          const out = join(dir, `again-${layout}-${name}.raw`);
          await run('nbdcopy', ['--request-size=65536', exportUri(serving, `vm@${id}`), out]);
          return sha256(out);
        };
        // The first backup checked whole, then pushed out of the cache by the second, then read in 64 KiB pieces in place.
        expect(await copy(first, 'first')).toBe(firstSha);
        expect(await copy(second, 'second')).toBe(await sha256(disk));
        expect(await copy(first, 'again')).toBe(firstSha);
      } finally {
        expect(await serving.stop()).toBe(0);
      }
    });
  }

  it('nbdinfo lists every backup as an export and maps the blocks no backup stores as holes', async () => {
    const c = await chain('listing', 'dir');
    const serving = await startServe(c.repo, 'vm', '--listen', '127.0.0.1:0', '--backup', c.ids[1]!, '--name', 'restore-me');
    try {
      expect(serving.uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/restore-me$/);
      const list = await nbdinfo('--list', '--json', serving.uri);
      const names = (JSON.parse(list).exports as Array<{ 'export-name': string; 'is_read_only': boolean; 'export-size': number }>).map((e) => e['export-name']);
      expect(names).toEqual(['restore-me', ...c.ids.map((id) => `vm@${id}`)]);
      for (const query of ['--map', '--map=base:allocation']) {
        const map = (await nbdinfo(query, '--json', serving.uri)).trim();
        expect(JSON.parse(map)).toEqual([
          { offset: 0, length: 8 * MiB, type: 0, description: 'data' },
          { offset: 8 * MiB, length: 2 * MiB, type: 3, description: 'hole,zero' },
          { offset: 10 * MiB, length: 2 * MiB, type: 0, description: 'data' },
        ]);
      }
      // The chosen backup, not the latest, is the default export.
      const out = join(dir, 'listing-default.raw');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', serving.uri, out]);
      expect(await sha256(out)).toBe(c.content.get(c.ids[1]!));
    } finally {
      expect(await serving.stop('SIGINT')).toBe(0);
    }
  });
});

describe('serve --writable (instant restore)', () => {
  it('keeps qemu-io writes in the overlay: read back exact, the backup unchanged, restore --from-overlay exact', async () => {
    const c = await chain('writable', 'dir');
    const overlay = join(dir, 'writable.overlay');
    const expected = join(dir, 'writable-expected.raw');
    await copyFile(c.disk, expected);
    // Unaligned, aligned, across a block boundary, into a hole, at the very end, and zeroes (WRITE_ZEROES).
    const writes: Array<[number, number, number]> = [
      [1000, 70000, 0x5a],
      [BLOCK - 4096, 8192, 0x11],
      [8 * MiB + 512, 4096, 0x77],
      [SIZE - 512, 512, 0xee],
      [3 * MiB + 100, 5000, 0],
    ];
    const fh = await open(expected, 'r+');
    for (const [offset, length, pattern] of writes) await fh.write(Buffer.alloc(length, pattern), 0, length, offset);
    await fh.close();

    const serving = await startServe(c.repo, 'vm', '--socket', join(dir, 'writable.sock'), '--writable', '--overlay', overlay);
    try {
      expect(serving.ready.writable).toBe(true);
      const commands = writes.flatMap(([o, l, p]) => ['-c', p === 0 ? `write -z ${o} ${l}` : `write -P ${p} ${o} ${l}`]);
      const checks = writes.flatMap(([o, l, p]) => ['-c', `read -P ${p} ${o} ${l}`]);
      const io = await run('qemu-io', ['-f', 'raw', ...commands, ...checks, '-c', 'flush', serving.uri]);
      expect(io.stdout).not.toMatch(/fail/i);
      const through = join(dir, 'writable-through.raw');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', serving.uri, through]);
      expect(await sha256(through)).toBe(await sha256(expected));
      // The backup itself, served beside the overlay, is as it was.
      const pristine = join(dir, 'writable-pristine.raw');
      await run('nbdcopy', [exportUri(serving, `vm@${c.ids.at(-1)}`), pristine]);
      expect(await sha256(pristine)).toBe(c.content.get(c.ids.at(-1)!));
    } finally {
      expect(await serving.stop()).toBe(0);
    }
    expect((await vhdvaultAsync('verify', c.repo)).code).toBe(0);
    const restored = join(dir, 'writable-restored.raw');
    expect((await vhdvaultAsync('restore', c.repo, 'vm', restored)).code).toBe(0);
    expect(await sha256(restored)).toBe(c.content.get(c.ids.at(-1)!));

    for (const out of ['writable-merged.raw', 'writable-merged.vhd']) {
      const r = await vhdvaultAsync('restore', c.repo, 'vm', join(dir, out), '--from-overlay', overlay);
      expect(r.code, r.stderr).toBe(0);
    }
    expect(await sha256(join(dir, 'writable-merged.raw'))).toBe(await sha256(expected));
    const converted = join(dir, 'writable-merged-vhd.raw');
    await run('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', join(dir, 'writable-merged.vhd'), converted]);
    expect(await sha256(converted)).toBe(await sha256(expected));

    // Served again over the same overlay, the writes are still there.
    const again = await startServe(c.repo, 'vm', '--socket', join(dir, 'writable2.sock'), '--writable', '--overlay', overlay);
    try {
      const io = await run('qemu-io', ['-f', 'raw', '-r', ...writes.flatMap(([o, l, p]) => ['-c', `read -P ${p} ${o} ${l}`]), again.uri]);
      expect(io.stdout).not.toMatch(/fail/i);
    } finally {
      await again.stop();
    }
  });

  it('refuses an overlay inside the repository, one of another backup, and one another server uses', async () => {
    const c = await chain('refusals', 'vhd');
    const inside = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'x.sock'), '--writable', '--overlay', join(c.repo, 'ov'));
    expect(inside.code).toBe(2);
    expect(inside.stderr).toMatch(/inside the repository/);
    // However spelt: a new folder under a symlink into the repository.
    await symlink(join(c.repo, 'disks'), join(dir, 'into-repo'));
    const linked = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'x.sock'), '--writable', '--overlay', join(dir, 'into-repo', 'vm', 'ov'));
    expect(linked.code).toBe(2);
    expect(linked.stderr).toMatch(/inside the repository/);
    // Not a folder, or someone else's folder.
    await writeFile(join(dir, 'precious.txt'), 'mine');
    await mkdir(join(dir, 'busy-folder'));
    await writeFile(join(dir, 'busy-folder', 'notes.txt'), 'mine');
    for (const [target, problem] of [[join(dir, 'precious.txt'), /is not a folder/], [join(dir, 'busy-folder'), /holds other files \(notes\.txt\)/]] as const) {
      const r = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'x.sock'), '--writable', '--overlay', target);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(problem);
    }
    expect(await readFile(join(dir, 'precious.txt'), 'utf8')).toBe('mine');
    expect((await readdir(join(dir, 'busy-folder'))).sort()).toEqual(['notes.txt']);
    // A default export named like a backup's own export would serve the wrong backup.
    const clash = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'x.sock'), '--backup', c.ids[0]!, '--name', `vm@${c.ids[1]}`);
    expect(clash.code).toBe(2);
    const overlay = join(dir, 'refusals.overlay');
    const first = await startServe(c.repo, 'vm', '--socket', join(dir, 'r1.sock'), '--writable', '--overlay', overlay);
    try {
      const busy = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'r2.sock'), '--writable', '--overlay', overlay);
      expect(busy.code).toBe(1);
      expect(busy.stderr).toMatch(/overlay is in use by process/);
      const restoring = await vhdvaultAsync('restore', c.repo, 'vm', join(dir, 'busy.raw'), '--from-overlay', overlay);
      expect(restoring.code).toBe(1);
    } finally {
      await first.stop();
    }
    const other = await vhdvaultAsync('serve', c.repo, 'vm', '--backup', c.ids[0]!, '--socket', join(dir, 'r3.sock'), '--writable', '--overlay', overlay);
    expect(other.code).toBe(1);
    expect(other.stderr.trim().split('\n')).toHaveLength(1);
    expect(other.stderr).toMatch(/belongs to backup/);
    expect(JSON.parse(await readFile(join(overlay, 'overlay.json'), 'utf8')).backup).toBe(c.ids.at(-1));
  });
});

describe('what a killed or crashed server leaves', () => {
  it('a stale socket is replaced, a file where the socket should be is not', async () => {
    const c = await chain('stale', 'vhd');
    const socket = join(dir, 'stale.sock');
    const first = await startServe(c.repo, 'vm', '--socket', socket);
    expect(await first.stop('SIGKILL')).toBe(-1);
    const second = await startServe(c.repo, 'vm', '--socket', socket);
    const out = join(dir, 'stale.raw');
    await run('nbdcopy', [second.uri, out]);
    expect(await sha256(out)).toBe(c.content.get(c.ids.at(-1)!));
    expect(await second.stop()).toBe(0);
    await writeFile(join(dir, 'not-a-socket'), 'mine');
    const r = await vhdvaultAsync('serve', c.repo, 'vm', '--socket', join(dir, 'not-a-socket'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/exists and is not a socket/);
    expect(await readFile(join(dir, 'not-a-socket'), 'utf8')).toBe('mine');
  });

  it("an overlay's lock whose owner is gone (or unreadable: a reused pid) is taken over", async () => {
    const c = await chain('relock', 'vhd');
    const overlay = join(dir, 'relock.overlay');
    const first = await startServe(c.repo, 'vm', '--socket', join(dir, 'relock.sock'), '--writable', '--overlay', overlay);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 4096', '-c', 'flush', first.uri]);
    expect(await first.stop('SIGKILL')).toBe(-1);
    await writeFile(join(overlay, 'lock'), '1\n'); // a bare pid, as a reused one would look
    const again = await startServe(c.repo, 'vm', '--socket', join(dir, 'relock.sock'), '--writable', '--overlay', overlay);
    const io = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x42 0 4096', again.uri]);
    expect(io.stdout).not.toMatch(/fail/i);
    expect(await again.stop()).toBe(0);
  });

  it('prune keeps the backup an overlay sits on until the overlay folder is gone', async () => {
    const c = await chain('pinned', 'dir');
    const overlay = join(dir, 'pinned.overlay');
    const serving = await startServe(c.repo, 'vm', '--socket', join(dir, 'pinned.sock'), '--backup', c.ids[0]!, '--writable', '--overlay', overlay);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x24 4096 4096', '-c', 'flush', serving.uri]);
    expect(await serving.stop()).toBe(0);
    const kept = await vhdvaultAsync('prune', c.repo, 'vm', '--keep-last', '1', '--json');
    expect(kept.code, kept.stderr).toBe(0);
    expect(JSON.parse(kept.stdout).kept).toContain(c.ids[0]);
    expect(kept.stderr).toMatch(/the overlay .* sits on it/);
    const restored = join(dir, 'pinned.raw');
    expect((await vhdvaultAsync('restore', c.repo, 'vm', restored, '--from-overlay', overlay)).code).toBe(0);
    await rm(overlay, { recursive: true });
    const pruned = await vhdvaultAsync('prune', c.repo, 'vm', '--keep-last', '1', '--json');
    expect(pruned.code, pruned.stderr).toBe(0);
    expect(JSON.parse(pruned.stdout).kept).toEqual([c.ids.at(-1)]);
    expect((await vhdvaultAsync('verify', c.repo)).code).toBe(0);
  });
});

describe('serve usage', () => {
  it('rejects bad flags with exit 2 and a missing backup with exit 1, one line each', async () => {
    const c = await chain('usage', 'vhd');
    const both = await vhdvaultAsync('serve', c.repo, 'vm', '--listen', '127.0.0.1:0', '--socket', join(dir, 'u.sock'));
    expect(both.code).toBe(2);
    const port = await vhdvaultAsync('serve', c.repo, 'vm', '--listen', '127.0.0.1:99999');
    expect(port.code).toBe(2);
    const missing = await vhdvaultAsync('serve', c.repo, 'vm', '--backup', '20200101T000000000Z-abcdef', '--socket', join(dir, 'u.sock'));
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    const noDisk = await vhdvaultAsync('serve', c.repo, 'nope', '--socket', join(dir, 'u.sock'));
    expect(noDisk.code).toBe(1);
    expect(noDisk.stderr).not.toMatch(/\n\s+at /);
  });
});
