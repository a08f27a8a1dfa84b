// vitest: slow (boots a real Linux guest under libvirt; started first on a fresh checkout, see vitest.config.ts)
/**
 * `vm backup --libvirt` of a real two-disk guest defined in a real libvirtd,
 * its writer putting the same counter on both disks: full then delta through
 * libvirt's pull backups, quiesced through libvirt's agent channel and not;
 * each restored disk clean, the two counters within one; libvirt's
 * checkpoints kept in step (only the newest VM backup's stays); a killed run's
 * job aborted by the next; a shut-off domain read from its images; one-line
 * refusals.
 */
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkpoints } from '../src/live/libvirtDomain.js';
import { CLI, type CliResult, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { makeExt4Disk, restoredCounters as restoreEach } from './helpers/guest.js';
import { defineGuest, LIBVIRT, type LibvirtGuest, libvirtSkip, libvirtTitle } from './helpers/libvirt.js';

interface VmReport {
  id: string;
  disks: Record<string, { id: string; kind: string; blocksRead: number; note?: string }>;
  quiesced: boolean;
  frozenMs: number | null;
  pausedMs: number | null;
}

describe.skipIf(libvirtSkip !== undefined)(libvirtTitle('vm backup --libvirt of a running two-disk domain'), () => {
  let dir: string;
  let guest: LibvirtGuest;
  let repo: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-vmlibvirt-');
    const images = ['vda', 'vdb'].map((d) => join(dir, `${d}.qcow2`));
    for (const image of images) await makeExt4Disk(image, 32);
    guest = await defineGuest({ disks: images, writer: true });
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
  });
  afterAll(async () => {
    await guest?.shutdown();
  });

  const args = (...extra: string[]) => ['vm', 'backup', repo, 'db', '--libvirt', guest.name, '--connect', LIBVIRT, '--json', ...extra];

  async function vmBackup(...extra: string[]): Promise<VmReport> {
    const r = await vhdvaultAsync(...args(...extra));
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as VmReport;
  }

  const restoredCounters = (report: VmReport, quiesced: boolean) =>
    restoreEach(repo, 'db', Object.fromEntries(Object.entries(report.disks).map(([t, d]) => [t, d.id])), dir, quiesced);

  const ours = async () => (await checkpoints(LIBVIRT, guest.name)).filter((c) => c.startsWith('vhdvault-'));

  it('full then delta, quiesced through the agent and not: one instant for both disks, checkpoints in step', async () => {
    const cases = [
      { extra: [], kind: 'full', quiesced: true },
      { extra: [], kind: 'delta', quiesced: true },
      { extra: ['--no-quiesce'], kind: 'delta', quiesced: false },
    ];
    for (const c of cases) {
      const report = await vmBackup(...c.extra);
      expect(Object.keys(report.disks).sort()).toEqual(['vda', 'vdb']);
      expect(Object.values(report.disks).map((d) => d.kind)).toEqual([c.kind, c.kind]);
      expect(report.quiesced).toBe(c.quiesced);
      if (c.quiesced) expect(report.frozenMs).toBeGreaterThan(0);
      else expect(report.pausedMs).toBeGreaterThanOrEqual(0);
      if (c.kind === 'delta') for (const d of Object.values(report.disks)) expect(d.blocksRead).toBeLessThan(16);
      const counters = await restoredCounters(report, c.quiesced);
      expect(Math.abs(counters[0]! - counters[1]!), `counters ${counters}`).toBeLessThanOrEqual(1);
      console.log(`vm backup --libvirt ${c.kind}: quiesced ${report.quiesced}, frozen ${report.frozenMs} ms, paused ${report.pausedMs} ms, counters ${counters}`);
      // libvirt 9.0 exports its views read-only: nothing is discarded from them (docs/vm-backups.md says so).
      for (const d of Object.values(report.disks)) expect((d as unknown as { discardedBytes: number }).discardedBytes).toBe(0);
      // Only the newest VM backup's checkpoint is left, and it is the one its record names.
      const list = (JSON.parse((await vhdvaultAsync('vm', 'list', repo, 'db', '--json')).stdout) as { backups: Array<{ id: string; checkpoint: string }> }).backups;
      expect(await ours()).toEqual([list.at(-1)!.checkpoint]);
    }
    expect((await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-scratch-'))).toEqual([]);
  });

  it('a checkpoint gone from libvirt: the next backup reads everything and says why', async () => {
    const [checkpoint] = await ours();
    const virsh = await import('../src/live/libvirtDomain.js');
    await virsh.deleteCheckpoint(LIBVIRT, guest.name, checkpoint!);
    const report = await vmBackup();
    for (const d of Object.values(report.disks)) expect(d.note).toMatch(/checkpoint .* is gone from libvirt/);
    expect(await ours()).toHaveLength(1);
  });

  it('killed during the reads: the next run aborts libvirt\'s job, removes its scratch images and goes on', async () => {
    const child = spawn(process.execPath, [CLI, ...args()], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    // The job runs once libvirt's NBD socket is there: kill then.
    const scratch = async () => (await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-scratch-'));
    for (let i = 0; i < 300 && (await scratch()).length === 0; i++) await new Promise((r) => setTimeout(r, 20));
    for (let i = 0; i < 300; i++) {
      const [folder] = await scratch();
      if (folder && (await readdir(join(tmpdir(), folder)).catch(() => [])).some((n) => n.endsWith('.scratch.qcow2'))) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    child.kill('SIGKILL');
    const done: CliResult = await new Promise((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout: '', stderr })));
    expect(done.code).toBe(-1);
    const next = await vhdvaultAsync(...args());
    expect(next.code, next.stderr).toBe(0);
    expect(next.stderr).toMatch(/aborted the backup job that process \d+ on host .* left running when it was killed/);
    // The killed run's scratch folder went with its job.
    expect(await scratch()).toEqual([]);
    expect(await ours()).toHaveLength(1);
  });

  it('refuses, with one line and nothing changed: a missing domain, --require-quiesce without an agent channel, mixed flags', async () => {
    const before = (await vhdvaultAsync('vm', 'list', repo, 'db', '--json')).stdout;
    const missing = await vhdvaultAsync('vm', 'backup', repo, 'db', '--libvirt', 'no-such-domain', '--connect', LIBVIRT);
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim()).toMatch(/^vhdvault: domain "no-such-domain": does not exist on /);
    const mixed = await vhdvaultAsync('vm', 'backup', repo, 'db', '--libvirt', guest.name, '--qga', '/x.sock');
    expect(mixed.code).toBe(2);
    const both = await vhdvaultAsync('vm', 'backup', repo, 'db', '--libvirt', guest.name, '--qemu', '/x.sock');
    expect(both.code).toBe(2);
    expect((await vhdvaultAsync('vm', 'list', repo, 'db', '--json')).stdout).toBe(before);
  });

  it('a shut-off domain: its images are read as they are, a delta from the newest checkpoint\'s persistent bitmap', async () => {
    await guest.powerOff();
    const report = await vmBackup();
    expect(report.quiesced).toBe(false);
    expect(Object.values(report.disks).map((d) => d.kind)).toEqual(['delta', 'delta']);
    const counters = await restoredCounters(report, false);
    expect(Math.abs(counters[0]! - counters[1]!), `counters ${counters}`).toBeLessThanOrEqual(1);
    // QEMU stopped by SIGTERM (virsh destroy --graceful) stores the checkpoint's bitmap in each image: read here.
    for (const d of Object.values(report.disks)) {
      expect(d.note, JSON.stringify(report.disks)).toBeUndefined();
      expect(d.blocksRead).toBeLessThan(16);
    }
  });
});

describe.skipIf(libvirtSkip !== undefined)(libvirtTitle('vm backup --libvirt of a domain without an agent channel'), () => {
  it('--require-quiesce refuses with one line and commits nothing', async () => {
    const dir = await tempDir('vhdvault-vmlibvirt-noagent-');
    const image = join(dir, 'vda.qcow2');
    await makeExt4Disk(image, 32);
    const guest = await defineGuest({ disks: [image], agent: false });
    try {
      const repo = join(dir, 'repo');
      expect((await vhdvaultAsync('init', repo)).code).toBe(0);
      const r = await vhdvaultAsync('vm', 'backup', repo, 'solo', '--libvirt', guest.name, '--connect', LIBVIRT, '--require-quiesce');
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/no guest agent channel \(org\.qemu\.guest_agent\.0\); nothing was backed up/);
      expect(JSON.parse((await vhdvaultAsync('vm', 'list', repo, '--json')).stdout)).toEqual({ format: 'vhdvault-vm-list/1', backups: [] });
      const ok = await vhdvaultAsync('vm', 'backup', repo, 'solo', '--libvirt', guest.name, '--connect', LIBVIRT, '--json');
      expect(ok.code, ok.stderr).toBe(0);
      const report = JSON.parse(ok.stdout) as VmReport;
      expect(report.quiesced).toBe(false);
      expect(report.pausedMs).toBeGreaterThanOrEqual(0);
    } finally {
      await guest.shutdown();
    }
  });
});
