// vitest: slow (boots a real Linux guest; started first on a fresh checkout, see vitest.config.ts)
/**
 * `vm backup --qemu` of a real two-disk Linux guest whose writer puts the
 * same counter on both disks, then syncs, many times a second: every disk is
 * taken at one instant (frozen through the agent, or with the VM paused), so
 * each restored disk is a clean ext4 and the two counters differ by at most
 * one; a delta follows from the checkpoints; `vm list` shows the VM backups.
 * The repository is encrypted: VM records, definitions and every disk's
 * backups go through the sealed storage (the other VM tests use plain ones).
 */
import { spawn, spawnSync } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { markerPath } from '../src/live/quiesce.js';
import { CLI, type CliResult, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { bootGuest, type Guest, guestSkip, guestTitle, makeExt4Disk, restoredCounters as restoreEach } from './helpers/guest.js';

// Every CLI run of this file gets the password; key files made here are cheap to derive.
process.env.VHDVAULT_PASSWORD = 'vm backups are sealed';
process.env.VHDVAULT_TEST_SCRYPT_N = '1024';

/** vhdvault with extra environment variables. */
function vhdvaultWith(env: NodeJS.ProcessEnv, ...args: string[]): Promise<CliResult> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv(env) });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr })));
}

interface VmReport {
  id: string;
  disks: Record<string, { id: string; kind: string; blocksRead: number }>;
  quiesced: boolean;
  frozenMs: number | null;
  pausedMs: number | null;
}

describe.skipIf(guestSkip !== undefined)(guestTitle('vm backup --qemu of a running two-disk guest'), () => {
  let dir: string;
  let guest: Guest;
  let repo: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-vmqemu-');
    const images = [join(dir, 'vda.qcow2'), join(dir, 'vdb.raw')];
    for (const image of images) await makeExt4Disk(image, 32);
    guest = await bootGuest({ disks: images, writer: true });
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo, '--encryption', 'aes-256-gcm')).code).toBe(0);
  });
  afterAll(async () => {
    await guest?.kill();
  });

  async function vmBackup(...extra: string[]): Promise<VmReport> {
    const r = await vhdvaultAsync('vm', 'backup', repo, 'web', '--qemu', guest.qmpSocket, '--fleecing', dir, '--json', ...extra);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as VmReport;
  }

  const restoredCounters = (report: VmReport, quiesced: boolean) =>
    restoreEach(repo, 'web', Object.fromEntries(Object.entries(report.disks).map(([t, d]) => [t, d.id])), dir, quiesced);

  it('quiesced through the agent: one frozen window for both disks, full then delta, counters within one', async () => {
    const seen: number[] = [];
    for (const kind of ['full', 'delta']) {
      const report = await vmBackup('--qga', guest.qgaSocket);
      expect(Object.keys(report.disks).sort()).toEqual(['vda', 'vdb']);
      expect(Object.values(report.disks).map((d) => d.kind)).toEqual([kind, kind]);
      expect(report.quiesced).toBe(true);
      expect(report.frozenMs).toBeGreaterThan(0);
      expect(report.pausedMs).toBeNull();
      const counters = await restoredCounters(report, true);
      expect(Math.abs(counters[0]! - counters[1]!), `counters ${counters}`).toBeLessThanOrEqual(1);
      seen.push(Math.min(...counters));
      console.log(`vm backup ${kind}, quiesced: frozen ${report.frozenMs} ms, counters ${counters}`);
    }
    expect(seen[1]).toBeGreaterThan(seen[0]!);
  });

  it('without an agent: the VM paused for the instant, counters within one, the guest running after', async () => {
    for (let i = 0; i < 2; i++) {
      const report = await vmBackup('--no-quiesce');
      expect(report.quiesced).toBe(false);
      expect(report.pausedMs).toBeGreaterThanOrEqual(0);
      const counters = await restoredCounters(report, false);
      expect(Math.abs(counters[0]! - counters[1]!), `counters ${counters}`).toBeLessThanOrEqual(1);
      console.log(`vm backup, paused ${report.pausedMs} ms: counters ${counters}`);
    }
    const status = await guest.testQmp.execute<{ running: boolean }>('query-status');
    expect(status.running).toBe(true);
  });

  it('an agent that never answers: a warning, then the VM paused instead; a VM a killed run left paused is resumed by the next', async () => {
    // A socket that accepts and never answers: the agent times out (1 s here).
    const silent = join(dir, 'silent-qga.sock');
    const server = createServer(() => undefined);
    await new Promise<void>((resolve) => server.listen(silent, resolve));
    try {
      const r = await vhdvaultWith({ VHDVAULT_QGA_TIMEOUT_S: '1' }, 'vm', 'backup', repo, 'web', '--qemu', guest.qmpSocket, '--qga', silent, '--fleecing', dir, '--json');
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/backing up without quiescing \(crash-consistent\)/);
      const report = JSON.parse(r.stdout) as VmReport;
      expect(report.quiesced).toBe(false);
      expect(report.pausedMs).toBeGreaterThanOrEqual(0);
    } finally {
      server.close();
    }
    // As after a kill -9 inside the pause: the VM stopped, the marker naming a process that is gone.
    const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    const owner = { ...(await import('../src/util/owner.js')).lockOwner('backup'), pid: Number(gone.stdout) };
    await writeFile(await markerPath(guest.qmpSocket, 'paused'), JSON.stringify(owner));
    await guest.testQmp.execute('stop');
    const next = await vhdvaultAsync('vm', 'backup', repo, 'web', '--qemu', guest.qmpSocket, '--no-quiesce', '--fleecing', dir, '--json');
    expect(next.code, next.stderr).toBe(0);
    expect(next.stderr).toMatch(new RegExp(`resumed the VM, which process ${owner.pid} on host .* left paused when it was killed`));
    expect((await guest.testQmp.execute<{ running: boolean }>('query-status')).running).toBe(true);
    expect((JSON.parse(next.stdout) as VmReport).pausedMs).toBeGreaterThanOrEqual(0);
  });

  it('vm list shows each VM backup with its disks, quiescing and definition', async () => {
    const r = await vhdvaultAsync('vm', 'list', repo, 'web', '--json');
    expect(r.code, r.stderr).toBe(0);
    const rows = (JSON.parse(r.stdout) as { backups: Array<{ id: string; time: string; disks: Record<string, string>; quiesced: boolean; definition: { kind: string } }> }).backups;
    expect(rows.map((x) => x.quiesced)).toEqual([true, true, false, false, false, false]);
    for (const row of rows) {
      expect(Object.keys(row.disks).sort()).toEqual(['vda', 'vdb']);
      expect(row.definition.kind).toBe('qemu');
    }
    // Sealed: the VM's records are not readable JSON in the repository.
    const records = join(repo, 'vms', 'web');
    for (const name of (await readdir(records)).filter((n) => n.endsWith('.json'))) {
      expect((await readFile(join(records, name))).subarray(0, 4).toString('latin1'), name).toBe('VVE\x01');
    }
    const disks = await vhdvaultAsync('list', repo, '--json');
    expect((JSON.parse(disks.stdout) as { backups: Array<{ disk: string }> }).backups.map((d) => d.disk).sort()).toEqual([...Array(6).fill('web.vda'), ...Array(6).fill('web.vdb')]);
  });

  it('refuses what cannot be done, with one line, before anything is changed', async () => {
    const bad = [
      [['--disks', 'vdz'], /no writable disk device "vdz"/, 1],
      [['--require-quiesce'], /--require-quiesce: needs a guest agent/, 1],
      [['--no-quiesce', '--require-quiesce'], /contradict/, 2],
    ] as const;
    for (const [args, message, code] of bad) {
      // With --fleecing: direct mode is refused first on an encrypted repository.
      const r = await vhdvaultAsync('vm', 'backup', repo, 'web', '--qemu', guest.qmpSocket, '--fleecing', dir, ...args);
      expect(r.code, r.stderr).toBe(code);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const named = await vhdvaultAsync('vm', 'backup', repo, 'a.b', '--qemu', guest.qmpSocket);
    expect(named.code).toBe(1);
    expect(named.stderr).toMatch(/invalid VM name/);
    const list = await vhdvaultAsync('vm', 'list', repo, 'web', '--json');
    expect(JSON.parse(list.stdout).backups).toHaveLength(6);
  });
});
