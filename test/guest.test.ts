/**
 * The real Linux guest (test/helpers/guest.ts) that whole-VM backup tests stand
 * on: it boots over two ext4 disks (one raw, one qcow2), its guest agent
 * answers and freezes both filesystems, its writer's counter stops on disk
 * while they are frozen and goes on after the thaw, and a power cut leaves both
 * filesystems clean once their journals are replayed, the counters at most one
 * apart. The disks are read from the host (debugfs, e2fsck), as a backup would
 * see them. Boot, freeze and thaw times are printed, not checked.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/files.js';
import { bootGuest, e2fsck, ext4Cat, type Guest, guestSkip, guestTitle, makeExt4Disk, replayJournal, withRaw } from './helpers/guest.js';
import { QgaClient } from './helpers/qga.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The writer's counter on each disk, read from the host's images (NaN before the first write). */
const counters = (guest: Guest) =>
  Promise.all(guest.disks.map((d) => withRaw(d.image, async (raw) => Number.parseInt(await ext4Cat(raw, '/counter'), 10))));

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t = performance.now();
  const value = await fn();
  return [value, Math.round(performance.now() - t)];
}

describe.skipIf(guestSkip !== undefined)(guestTitle('a real Linux guest'), () => {
  it('freezes and thaws its two ext4 disks through the guest agent while its writer runs; after a power cut both are clean and agree', async () => {
    // (Made here, not at the top: when the suite is skipped, vitest runs no afterAll to remove it.)
    const dir = await tempDir('vhdvault-guesttest-');
    const images = [join(dir, 'vda.raw'), join(dir, 'vdb.qcow2')];
    await Promise.all(images.map((image) => makeExt4Disk(image, 32)));
    const guest = await bootGuest({ disks: images, writer: true });
    const times: string[] = [`initramfs ${guest.initramfs.built ? 'built' : 'from the cache'} in ${guest.initramfs.ms} ms`, `boot ${guest.bootMs} ms`];
    try {
      expect(guest.disks.map((d) => [d.device, d.format])).toEqual([
        ['vda', 'raw'],
        ['vdb', 'qcow2'],
      ]);
      const qga = await QgaClient.connect(guest.qgaSocket);
      try {
        expect(await qga.execute('guest-ping')).toEqual({});
        const fsinfo = await qga.execute<Array<{ mountpoint: string; type: string }>>('guest-get-fsinfo');
        expect(fsinfo.map((f) => `${f.mountpoint} ${f.type}`).sort()).toEqual(['/mnt/vda ext4', '/mnt/vdb ext4']);

        // The writer reaches both disks.
        let before = await counters(guest);
        for (let i = 0; i < 100 && !before.every((n) => n > 0); i++) before = (await sleep(100), await counters(guest));
        expect(before.every((n) => n > 0), `counters ${before}`).toBe(true);

        const [frozen, freezeMs] = await timed(() => qga.execute<number>('guest-fsfreeze-freeze'));
        times.push(`freeze ${freezeMs} ms`);
        expect(frozen).toBe(2);
        expect(await qga.execute('guest-fsfreeze-status')).toBe('frozen');
        // Frozen: the images are consistent as they are, and nothing changes them.
        const atFreeze = await counters(guest);
        for (const d of guest.disks) {
          const fsck = await withRaw(d.image, e2fsck);
          expect(fsck.code, `${d.device} while frozen: ${fsck.output}`).toBe(0);
          // (e2fsck -n would skip a journal replay and say so: a frozen ext4 needs none.)
          expect(fsck.output).not.toMatch(/journal recovery/);
        }
        await sleep(1000);
        expect(await counters(guest)).toEqual(atFreeze);
        expect(Math.abs(atFreeze[0]! - atFreeze[1]!), `counters while frozen: ${atFreeze}`).toBeLessThanOrEqual(1);
        expect(Math.min(...atFreeze)).toBeGreaterThanOrEqual(Math.min(...before));

        const [thawed, thawMs] = await timed(() => qga.execute<number>('guest-fsfreeze-thaw'));
        times.push(`thaw ${thawMs} ms`);
        expect(thawed).toBe(2);
        expect(await qga.execute('guest-fsfreeze-status')).toBe('thawed');
        let after = await counters(guest);
        for (let i = 0; i < 100 && !after.every((n) => n > Math.max(...atFreeze)); i++) after = (await sleep(100), await counters(guest));
        expect(after.every((n) => n > Math.max(...atFreeze)), `counters ${atFreeze} at the freeze, ${after} after the thaw`).toBe(true);
      } finally {
        await qga.close();
      }
    } finally {
      await guest.kill();
      console.log(`real guest (${guest.accel}): ${times.join(', ')}`);
    }

    // A power cut mid-write: once each journal is replayed (as a mount would), both filesystems are clean.
    const last: number[] = [];
    for (const d of guest.disks) {
      await withRaw(d.image, async (raw) => {
        await replayJournal(raw);
        const fsck = await e2fsck(raw);
        expect(fsck.code, `${d.device} after the power cut: ${fsck.output}`).toBe(0);
        last.push(Number.parseInt(await ext4Cat(raw, '/counter'), 10));
      });
    }
    expect(Math.abs(last[0]! - last[1]!), `counters after the power cut: ${last}`).toBeLessThanOrEqual(1);
    expect(guest.console()).not.toMatch(/Call Trace|Kernel panic|BUG:|EXT4-fs error/);
  });
});
