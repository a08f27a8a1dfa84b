// vitest: slow (boots a real Linux guest under libvirt, and restarts libvirtd; started first on a fresh checkout, see vitest.config.ts)
/**
 * libvirtd restarted in the middle of `vm backup --libvirt`: the reads go on
 * (QEMU serves the exports, not libvirtd), the backup commits, the job is
 * ended through the new libvirtd, and the next backups are deltas with one
 * checkpoint left. The vhdvault process is stopped (SIGSTOP) while its reads
 * are under way, libvirtd is restarted, and the process continued: no timing
 * is guessed. libvirtd is held by this file alone meanwhile (the other libvirt
 * test files wait: test/helpers/libvirt.ts).
 */
import { execFile, spawn } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { checkpoints } from '../src/live/libvirtDomain.js';
import { CLI, type CliResult, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { e2fsck, makeExt4Disk, replayJournal } from './helpers/guest.js';
import { defineGuest, LIBVIRT, libvirtSkip, withLibvirtAlone } from './helpers/libvirt.js';

const execFileAsync = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const PID_FILE = '/var/run/libvirtd.pid';

/** libvirtd stopped (TERM, waited for) and started again; resolves once the new one answers. */
async function restartLibvirtd(): Promise<void> {
  const pid = Number((await readFile(PID_FILE, 'utf8')).trim());
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 300; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      break;
    }
    await sleep(50);
  }
  await execFileAsync('libvirtd', ['-d']);
  for (let i = 0; ; i++) {
    const answered = await execFileAsync('virsh', ['-c', LIBVIRT, 'version']).then(() => true, () => false);
    if (answered) return;
    if (i > 300) throw new Error('libvirtd did not answer after its restart');
    await sleep(100);
  }
}

// Only a libvirtd this machine runs from a pid file (as .ci/run starts it) is restarted here.
const restartSkip = libvirtSkip ?? (process.env.CI ? undefined : 'it restarts libvirtd: run it under CI (.ci/run), or with CI=1 where libvirtd runs as `libvirtd -d`');
const TITLE = 'vm backup --libvirt across a libvirtd restart';

describe.skipIf(restartSkip !== undefined)(restartSkip === undefined ? TITLE : `${TITLE} [skipped: ${restartSkip}]`, () => {
  it('the backup whose reads libvirtd\'s restart interrupts commits; the job ends, and the next backups are deltas', async () => {
    await withLibvirtAlone(async () => {
      const dir = await tempDir('vhdvault-libvirt-restart-');
      const images = ['vda', 'vdb'].map((d) => join(dir, `${d}.qcow2`));
      for (const image of images) await makeExt4Disk(image, 32);
      const guest = await defineGuest({ disks: images, writer: true });
      try {
        const repo = join(dir, 'repo');
        expect((await vhdvaultAsync('init', repo)).code).toBe(0);
        const args = ['vm', 'backup', repo, 'db', '--libvirt', guest.name, '--connect', LIBVIRT, '--json'];
        expect((await vhdvaultAsync(...args)).code).toBe(0);

        const child = spawn(process.execPath, [CLI, ...args, '--full'], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
        let stdout = '';
        let stderr = '';
        child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
        child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
        const done: Promise<CliResult> = new Promise((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr })));
        // The reads are under way once a disk's backup is staged (after libvirt's job began).
        for (let i = 0; i < 5000; i++) {
          const names = await readdir(join(repo, 'disks', 'db.vda')).catch(() => [] as string[]);
          if (names.some((n) => /^\.\d{8}T.*\.tmp$/.test(n))) break;
          await sleep(2);
        }
        child.kill('SIGSTOP');
        try {
          await restartLibvirtd();
        } finally {
          child.kill('SIGCONT');
        }
        const r = await done;
        expect(r.code, r.stderr).toBe(0);
        const report = JSON.parse(r.stdout) as { id: string; disks: Record<string, { id: string; kind: string }> };
        expect(Object.values(report.disks).map((d) => d.kind)).toEqual(['full', 'full']);
        const jobs = (await execFileAsync('virsh', ['-c', LIBVIRT, 'domjobinfo', guest.name])).stdout;
        expect(jobs).toMatch(/Job type:\s+None/);
        for (const [target, disk] of Object.entries(report.disks)) {
          const out = join(dir, `${target}.raw`);
          expect((await vhdvaultAsync('restore', repo, `db.${target}`, out, '--backup', disk.id)).code).toBe(0);
          await replayJournal(out);
          expect((await e2fsck(out)).code).toBe(0);
        }

        const next = await vhdvaultAsync(...args);
        expect(next.code, next.stderr).toBe(0);
        expect(Object.values((JSON.parse(next.stdout) as typeof report).disks).map((d) => d.kind)).toEqual(['delta', 'delta']);
        expect((await checkpoints(LIBVIRT, guest.name)).filter((c) => c.startsWith('vhdvault-'))).toHaveLength(1);
      } finally {
        await guest.shutdown();
      }
    });
  });
});
