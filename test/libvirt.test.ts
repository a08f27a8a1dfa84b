// vitest: slow (boots a real Linux guest; started first on a fresh checkout, see vitest.config.ts)
/**
 * Backups of a libvirt domain through virsh (src/live/libvirtDomain.ts,
 * libvirtBackup.ts, virshAgent.ts), with the real two-disk Linux guest of
 * test/helpers/libvirt.ts writing its counter on both disks meanwhile:
 * libvirt's pull backups read whole through NbdSource give ext4 images that
 * are clean after a journal replay and hold the same point in time on both
 * disks; an incremental one carries a dirty bitmap NbdSource reads; a job a
 * killed vhdvault left is aborted by the next; the guest is quiesced through
 * libvirt's agent channel; and the errors are one line naming the domain.
 */
import { execFile, spawnSync } from 'node:child_process';
import { open, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { NbdSource } from '../src/nbd/NbdSource.js';
import { abortLeftoverJob, beginPullBackup, endBackup, type PullBackupOptions } from '../src/live/libvirtBackup.js';
import { checkpoints, deleteCheckpoint, domainInfo, resume, suspend } from '../src/live/libvirtDomain.js';
import { atQuiescedPoint } from '../src/live/quiesce.js';
import { VirshAgent } from '../src/live/virshAgent.js';
import { releaseBuffer } from '../src/util/bufferPool.js';
import { tempDir } from './helpers/files.js';
import { e2fsck, ext4Cat, makeExt4Disk, replayJournal } from './helpers/guest.js';
import { defineGuest, LIBVIRT, type LibvirtGuest, libvirtSkip, libvirtTitle } from './helpers/libvirt.js';

const execFileAsync = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(libvirtSkip !== undefined)(libvirtTitle('libvirt domains backed up through virsh'), () => {
  let dir: string;
  let guest: LibvirtGuest;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-libvirt-');
    const images = ['vda', 'vdb'].map((d) => join(dir, `${d}.qcow2`));
    for (const image of images) await makeExt4Disk(image, 32);
    guest = await defineGuest({ disks: images, writer: true });
    console.log(`libvirt guest ready in ${guest.bootMs} ms`);
  });

  const options = (o: Partial<PullBackupOptions>): PullBackupOptions => ({
    connect: guest.connect,
    domain: guest.name,
    scratchDir: dir,
    disks: ['vda', 'vdb'],
    incremental: null,
    checkpoint: 'cp0',
    socket: join(dir, 'nbd.sock'),
    ...o,
  });

  /** The whole export at `uri` into a raw file (holes left as holes). */
  async function readWhole(uri: string, out: string): Promise<void> {
    const source = await NbdSource.open(uri);
    const fh = await open(out, 'w');
    try {
      await fh.truncate(source.size);
      for (let b = 0; b < source.blockCount; b++) {
        const data = await source.readBlock(b);
        if (data === null) continue;
        await fh.write(data, 0, Math.min(source.blockSize, source.size - b * source.blockSize), b * source.blockSize);
        releaseBuffer(data);
      }
    } finally {
      await fh.close();
      await source.close();
    }
  }

  const jobType = async () => /Job type:\s*(\S+)/.exec((await execFileAsync('virsh', ['-c', LIBVIRT, 'domjobinfo', guest.name])).stdout)?.[1];
  const scratchLeft = async () => (await readdir(dir)).filter((n) => n.includes('scratch') || n.startsWith('vhdvault-libvirt-backup'));

  it('domainInfo: state, disks with their images and formats, the agent channel', async () => {
    const info = await domainInfo(guest.connect, guest.name);
    expect(info.name).toBe(guest.name);
    expect(info.uuid).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    expect(info.state).toBe('running');
    expect(info.disks).toEqual(guest.disks.map((d) => ({ target: d.target, source: d.image, driver: 'qcow2' })));
    expect(info.agent).toBe(true);
    expect(info.xml).toContain('<domain');
  });

  it('a full pull backup of both disks: clean ext4 after a journal replay, one point in time on both; then an incremental one with a dirty bitmap', async () => {
    let started = performance.now();
    const full = await beginPullBackup(options({}));
    expect(full.disks.map((d) => [d.target, d.exportName, d.bitmap])).toEqual([
      ['vda', 'vda', null],
      ['vdb', 'vdb', null],
    ]);
    const counters: number[] = [];
    try {
      for (const d of full.disks) await readWhole(d.uri, join(dir, `${d.target}.raw`));
    } finally {
      await endBackup(guest.connect, guest.name, dir);
    }
    console.log(`full pull backup of 2 × 32 MiB read in ${Math.round(performance.now() - started)} ms`);
    for (const target of ['vda', 'vdb']) {
      const raw = join(dir, `${target}.raw`);
      await replayJournal(raw);
      const fsck = await e2fsck(raw);
      expect(fsck.code, fsck.output).toBe(0);
      counters.push(Number.parseInt(await ext4Cat(raw, '/counter'), 10));
    }
    console.log(`counters in the full backup: vda ${counters[0]}, vdb ${counters[1]}`);
    expect(counters[0]).toBeGreaterThan(0);
    expect(Math.abs(counters[0]! - counters[1]!)).toBeLessThanOrEqual(1);
    expect(await scratchLeft()).toEqual([]);
    expect(await jobType()).toBe('None');
    expect(await checkpoints(guest.connect, guest.name)).toEqual(['cp0']);

    await sleep(300); // the writer writes into both disks meanwhile
    started = performance.now();
    const incremental = await beginPullBackup(options({ incremental: 'cp0', checkpoint: 'cp1' }));
    try {
      for (const d of incremental.disks) {
        expect(d.bitmap).toBe(`backup-${d.target}`);
        const source = await NbdSource.open(d.uri, { bitmap: d.bitmap });
        try {
          const dirty = await source.dirtyBlocks(d.bitmap!);
          expect(dirty.some((byte) => byte !== 0)).toBe(true);
        } finally {
          await source.close();
        }
      }
    } finally {
      await endBackup(guest.connect, guest.name, dir);
    }
    console.log(`incremental pull backup begun, bitmaps scanned and ended in ${Math.round(performance.now() - started)} ms`);
    expect(await scratchLeft()).toEqual([]);
    expect(await jobType()).toBe('None');
    expect(await checkpoints(guest.connect, guest.name)).toEqual(['cp0', 'cp1']);
    await deleteCheckpoint(guest.connect, guest.name, 'cp0');
    expect(await checkpoints(guest.connect, guest.name)).toEqual(['cp1']);
  });

  it("a job of a vhdvault still running is refused; one a killed vhdvault left is aborted by the next run, its scratch removed", async () => {
    await beginPullBackup(options({ checkpoint: 'cp-left' }));
    await expect(beginPullBackup(options({ checkpoint: 'cp-next' }))).rejects.toThrow(new RegExp(`^domain "${guest.name}": has a backup job that process ${process.pid} on host .* began and still runs$`));
    // As if a process now gone had begun it.
    const gone = spawnSync('true').pid!;
    const marker = join(dir, 'vhdvault-libvirt-backup.json');
    await writeFile(marker, (await readFile(marker, 'utf8')).replace(`"pid":${process.pid}`, `"pid":${gone}`));
    expect(await abortLeftoverJob(guest.connect, guest.name)).toMatch(new RegExp(`^aborted the backup job that process ${gone} on host .* left running when it was killed`));
    expect(await jobType()).toBe('None');
    expect(await scratchLeft()).toEqual([]);
    expect(await abortLeftoverJob(guest.connect, guest.name)).toBeNull();
    await endBackup(guest.connect, guest.name); // no job: nothing to do
    await deleteCheckpoint(guest.connect, guest.name, 'cp-left');
  });

  it('quiesces through libvirt’s agent channel: frozen while the point is set, thawed after', async () => {
    const agent = new VirshAgent(guest.connect, guest.name, 5_000);
    const warnings: string[] = [];
    let during = '';
    const started = performance.now();
    const r = await atQuiescedPoint({ agent, vm: `libvirt:${guest.connect}/${guest.name}`, mode: 'require', tell: (m) => warnings.push(m) }, async () => {
      during = await agent.execute<string>('guest-fsfreeze-status');
    });
    console.log(`quiesced through virsh qemu-agent-command in ${Math.round(performance.now() - started)} ms (frozen ${r.frozenMs} ms)`);
    expect(r.quiesced).toBe(true);
    expect(during).toBe('frozen');
    expect(await agent.execute('guest-fsfreeze-status')).toBe('thawed');
    expect(warnings).toEqual([]);
    await expect(agent.execute('guest-no-such-command')).rejects.toThrow(/guest-no-such-command.*has not been found/);
  });

  it('suspend and resume', async () => {
    await suspend(guest.connect, guest.name);
    expect((await domainInfo(guest.connect, guest.name)).state).toBe('paused');
    await resume(guest.connect, guest.name);
    expect((await domainInfo(guest.connect, guest.name)).state).toBe('running');
  });

  it('a domain that does not exist: one line naming it and the connection', async () => {
    await expect(domainInfo(LIBVIRT, 'vhdvault-no-such-domain')).rejects.toThrow(new RegExp(`^domain "vhdvault-no-such-domain": does not exist on ${LIBVIRT.replace(/[/:]/g, '\\$&')}$`));
    await expect(checkpoints(LIBVIRT, 'vhdvault-no-such-domain')).rejects.toThrow(/does not exist on/);
  });
});
