// vitest: slow (boots a real Linux guest; started first on a fresh checkout, see vitest.config.ts)
/**
 * A job with `vms:`: a real two-disk QEMU guest with its agent, backed up by
 * `job run` as one VM backup per run; its disks appear in the run report as
 * <vm>.<target>; retention keeps or removes whole VM backups; verify reads
 * the new ones; `healthCheck: boot` boots the newest VM backup.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { bootGuest, type Guest, guestSkip, guestTitle, makeExt4Disk } from './helpers/guest.js';

interface RunReport {
  ok: boolean;
  disks: Array<{ disk: string; vm?: string; ok: boolean; kind?: string; id?: string }>;
  vms: Array<{ vm: string; ok: boolean; id: string; quiesced: boolean; frozenMs: number | null }>;
  retention: { ok: boolean; removed: string[] };
  verify: { ok: boolean; backups: number };
  healthCheck: { ok: boolean; booted: Array<{ vm: string; id: string; ok: boolean; ms: number }> };
}

describe.skipIf(guestSkip !== undefined)(guestTitle('a job with vms:'), () => {
  let dir: string;
  let guest: Guest;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-vmjob-');
    const images = [join(dir, 'vda.qcow2'), join(dir, 'vdb.qcow2')];
    for (const image of images) await makeExt4Disk(image, 32);
    guest = await bootGuest({ disks: images, writer: true });
    expect((await vhdvaultAsync('init', join(dir, 'repo'))).code).toBe(0);
  });
  afterAll(async () => {
    await guest?.kill();
  });

  it('backs the VM up whole each run, keeps whole VM backups, verifies them and boots the newest', async () => {
    const file = join(dir, 'vms.yaml');
    const job = ['name: vms', 'schedule: "0 3 * * *"', 'repository: repo', 'verify: new', 'healthCheck: boot', 'retention:', '  keepLast: 1', 'vms:', '  - name: web', `    qmp: ${guest.qmpSocket}`, `    qga: ${guest.qgaSocket}`, `    fleecing: ${dir}`];
    await writeFile(file, `${job.join('\n')}\n`);
    const ids: string[] = [];
    for (const kind of ['full', 'delta']) {
      const r = await vhdvaultAsync('job', 'run', file, '--json');
      expect(r.code, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout) as RunReport;
      expect(report.ok, r.stdout).toBe(true);
      expect(report.vms).toHaveLength(1);
      expect(report.vms[0]).toMatchObject({ vm: 'web', ok: true, quiesced: true });
      ids.push(report.vms[0]!.id);
      expect(report.disks.map((d) => [d.disk, d.vm, d.kind])).toEqual([
        ['web.vda', 'web', kind],
        ['web.vdb', 'web', kind],
      ]);
      expect(report.verify).toMatchObject({ ok: true, backups: 2 });
      expect(report.healthCheck.booted).toEqual([{ vm: 'web', id: report.vms[0]!.id, ok: true, ms: expect.any(Number) }]);
      console.log(`job run (${kind}): VM frozen ${report.vms[0]!.frozenMs} ms; newest VM backup booted in ${report.healthCheck.booted[0]!.ms} ms`);
    }
    // keepLast 1: one VM backup left, and each of its disks' backups.
    const list = (JSON.parse((await vhdvaultAsync('vm', 'list', join(dir, 'repo'), '--json')).stdout) as { backups: Array<{ id: string; disks: Record<string, string> }> }).backups;
    expect(list.map((v) => v.id)).toEqual([ids[1]]);
    const disks = (JSON.parse((await vhdvaultAsync('list', join(dir, 'repo'), '--json')).stdout) as { backups: Array<{ disk: string; id: string }> }).backups;
    expect(disks.map((d) => `${d.disk} ${d.id}`).sort()).toEqual(Object.entries(list[0]!.disks).map(([t, id]) => `web.${t} ${id}`).sort());
    const history = await vhdvaultAsync('job', 'history', join(dir, 'repo'));
    expect(history.code, history.stderr).toBe(0);
  });
});
