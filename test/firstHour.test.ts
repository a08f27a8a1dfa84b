/**
 * What a new user meets first (issue 20's "first hour" and "right error"
 * findings): init makes only the repository's own folder; a source in another
 * URI scheme is refused by name; a restore never writes raw bytes under a
 * qcow2 (or other image) name; a disk never backed up — or whose only backup
 * failed — gets the same line from every command, with the disk probably meant.
 */
import { mkdir, readdir, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';

const MiB = 1024 * 1024;

describe('the first hour', () => {
  let dir: string;
  let repo: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-firsthour-');
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
    await makeRaw(join(dir, 'web.raw'), 4 * MiB, [[0, 4096]]);
    expect((await vhdvaultAsync('backup', repo, 'webserver', '--source', join(dir, 'web.raw'))).code).toBe(0);
  });

  it('init creates the repository folder, not a mistyped path\'s missing parents', async () => {
    const typo = join(dir, 'bakups', 'main');
    const r = await vhdvaultAsync('init', typo);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`vhdvault: ${typo}: its parent folder ${join(dir, 'bakups')} does not exist: create it first (init makes only the repository's own folder)`);
    expect(await stat(join(dir, 'bakups')).catch(() => null)).toBeNull();
    await mkdir(join(dir, 'bakups'));
    expect((await vhdvaultAsync('init', typo)).code).toBe(0);
  });

  it('a source in another URI scheme is refused by name, before anything is made', async () => {
    for (const source of ['http://example.com/disk.raw', 's3://bucket/disk.raw', 'file:///tmp/disk.raw']) {
      const r = await vhdvaultAsync('backup', repo, 'fresh', '--source', source);
      expect(r.code, source).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`does not read ${source.split(':')[0]}:// sources`));
    }
    expect(await readdir(join(repo, 'disks'))).toEqual(['webserver']);
  });

  it('restore refuses to write raw bytes under the name of another image format', async () => {
    for (const name of ['out.qcow2', 'out.vmdk', 'out.VHDX']) {
      const r = await vhdvaultAsync('restore', repo, 'webserver', join(dir, name));
      expect(r.code, name).toBe(2);
      expect(r.stderr).toMatch(/restore writes raw images, VHDs and VHD directories, not /);
      expect(await stat(join(dir, name)).catch(() => null)).toBeNull();
    }
    // Said plainly, it is written as asked.
    expect((await vhdvaultAsync('restore', repo, 'webserver', join(dir, 'raw.qcow2'), '--format', 'raw')).code).toBe(0);
  });

  it('--qemu given an NBD server\'s socket says what it is, not that QEMU sent no greeting', async () => {
    const socket = join(dir, 'nbd.sock');
    // An NBD server's first bytes (newstyle): the magic, IHAVEOPT, its handshake flags.
    const server = createServer((c) => c.write(Buffer.concat([Buffer.from('NBDMAGICIHAVEOPT', 'latin1'), Buffer.from([0, 3])])));
    await new Promise<void>((resolve) => server.listen(socket, resolve));
    try {
      const r = await vhdvaultAsync('backup', repo, 'vm', '--qemu', socket, '--node', 'disk0');
      expect(r.code).toBe(1);
      expect(r.stderr.trim()).toBe(`vhdvault: ${socket}: is an NBD server, not a QMP monitor (give the socket of QEMU's -qmp unix:<path>,server=on, or of qemu-storage-daemon's --chardev socket … --monitor)`);
    } finally {
      server.close();
    }
  });

  it('a disk with no backup gets one line from every command, with the disk probably meant', async () => {
    // What a failed first backup leaves: the disk's folder, with nothing in it.
    await mkdir(join(repo, 'disks', 'webserve'));
    const runs = [
      ['list', repo, 'webserve'],
      ['restore', repo, 'webserve', join(dir, 'x.raw')],
      ['verify', repo, 'webserve'],
      ['prune', repo, 'webserve', '--keep-last', '1'],
      ['list', repo, 'websrver'],
    ];
    const vm = await vhdvaultAsync('vm', 'list', repo, 'nosuch');
    expect(vm.code).toBe(1);
    expect(vm.stderr.trim()).toBe(`vhdvault: ${repo}: has no backup of VM "nosuch"`);
    for (const args of runs) {
      const r = await vhdvaultAsync(...args);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr.trim(), args.join(' ')).toBe(`vhdvault: ${repo}: has no backups of disk "${args[2]}" (did you mean webserver?)`);
    }
  });
});
