/**
 * `vhdvault daemon` on seconds-granular schedules: it fires, reports a run it
 * missed while down without replaying it, skips a run due while the previous
 * one still goes, reloads job files on SIGHUP (a broken edit keeps the old
 * version), and exits on SIGTERM leaving no partial backup.
 */
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { Daemon, killDaemons } from './helpers/daemon.js';
import { initRepo, listed } from './helpers/store.js';

afterAll(killDaemons);

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-daemon-');
const repo = join(dir, 'repo');
await initRepo(repo, 'dir');
await makeRaw(join(dir, 'small.raw'), 4 * MiB, [[0, 4 * MiB]]);
await makeRaw(join(dir, 'big.raw'), 16 * MiB, [[0, 16 * MiB]]);

const job = (name: string, schedule: string, disks: string[], extra = '') =>
  `name: ${name}\nschedule: "${schedule}"\nrepository: repo\n${extra}disks:\n${disks.map((d) => `  - name: ${d}\n    source: ${d.replace(/-.*/, '')}.raw\n`).join('')}`;

const leftovers = async (disk: string) => (await readdir(join(repo, 'disks', disk)).catch(() => [])).filter((n) => n.startsWith('.') || n === 'lock');

describe('vhdvault daemon', () => {
  it('fires on a seconds schedule, reloads on SIGHUP (keeping the old version of a broken edit), reports a missed run', async () => {
    const file = join(dir, 'every2s.yaml');
    await writeFile(file, job('every2s', '*/2 * * * * *', ['small-a']));
    const d = new Daemon(file);
    let at = await d.waitFor((e) => e.event === 'finished' && /every2s: run \S+ ok/.test(e.message));
    at = await d.waitFor((e) => e.event === 'finished' && /ok/.test(e.message), at + 1);
    // SIGHUP with a second disk: the next run backs up both.
    await writeFile(file, job('every2s', '*/2 * * * * *', ['small-a', 'small-b']));
    d.signal('SIGHUP');
    at = await d.waitFor((e) => e.event === 'loaded', at + 1);
    at = await d.waitFor((e) => e.event === 'finished' && /ok/.test(e.message), at + 1);
    expect((await listed(repo, 'small-b')).length).toBeGreaterThanOrEqual(1);
    // A broken edit is refused; the job stays scheduled as it was.
    await writeFile(file, 'name: every2s\nschedule: "every now and then"\nrepository: repo\ndisks: []\n');
    d.signal('SIGHUP');
    at = await d.waitFor((e) => e.event === 'invalid', at + 1);
    expect(d.events[at]!.message).toMatch(/every2s\.yaml: .*\(its previous version stays scheduled\)/);
    await d.waitFor((e) => e.event === 'finished' && /ok/.test(e.message), at + 1);
    d.signal('SIGTERM');
    expect(await d.exited).toBe(0);
    // Down for more than one period: the next daemon says so, and does not replay it.
    await writeFile(file, job('every2s', '*/2 * * * * *', ['small-a']));
    await new Promise((r) => setTimeout(r, 2500));
    const again = new Daemon(file);
    const missed = await again.waitFor((e) => e.event === 'missed');
    expect(again.events[missed]!.message).toMatch(/was missed \(the daemon was not running; last run .*\): not replayed/);
    expect(again.events.filter((e) => e.event === 'run')).toHaveLength(0); // not run at start
    again.signal('SIGTERM');
    expect(await again.exited).toBe(0);
  });

  it('skips a run due while the previous one still goes, and on SIGTERM stops the run in progress leaving no partial backup', async () => {
    const file = join(dir, 'slow.yaml');
    // 16 MiB at 4 MiB/s: each run takes about 4 s, the schedule fires every second.
    await writeFile(file, job('slow', '* * * * * *', ['big-slow'], 'maxWrite: 4M\nfullInterval: 1\n'));
    const d = new Daemon(file);
    let at = await d.waitFor((e) => e.event === 'run');
    at = await d.waitFor((e) => e.event === 'skipped', at + 1);
    expect(d.events[at]!.message).toMatch(/slow: the run due at \S+ is skipped: the previous run is still going/);
    // Let the first run finish, then stop the daemon in the middle of the next one.
    at = await d.waitFor((e) => e.event === 'finished', at + 1);
    at = await d.waitFor((e) => e.event === 'run', at + 1);
    await new Promise((r) => setTimeout(r, 1000));
    const stopAt = Date.now();
    d.signal('SIGTERM');
    expect(await d.exited).toBe(0);
    expect(Date.now() - stopAt).toBeLessThan(15_000);
    const fin = await d.waitFor((e) => e.event === 'finished', at + 1, 0);
    expect(d.events[fin]!.message).toMatch(/stopped/);
    expect(await leftovers('big-slow')).toEqual([]);
    const backups = await listed(repo, 'big-slow');
    expect(backups.length).toBeGreaterThanOrEqual(1);
    const v = await vhdvaultAsync('verify', repo, 'big-slow');
    expect(v.code, v.stdout + v.stderr).toBe(0);
    const h = await vhdvaultAsync('job', 'history', repo, '--job', 'slow', '--json');
    const runs = (JSON.parse(h.stdout) as { runs: Array<{ skipped?: string; stopped?: boolean }> }).runs;
    expect(runs.some((r) => r.skipped)).toBe(true);
    expect(runs.filter((r) => !r.skipped).at(-1)!.stopped).toBe(true);
  });
});
