/**
 * Two containers with the host's name (Kubernetes hostNetwork pods, `docker
 * --network host`) see the same host and boot, but each its own PID namespace:
 * a pid recorded in the other's lock says nothing here. Such a lock is never
 * taken over, whatever the pid looks like from here; the message names its
 * holder and how to release it: `vhdvault unlock`, which refuses a lock whose
 * holder runs here.
 */
import { existsSync, readFileSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { vhdvault } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { initRepo } from './helpers/store.js';

const MiB = 1024 * 1024;

/** Field 22 of /proc/<pid>/stat: the start time a lock records. */
const processStartOf = (pid: number) => {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
};

describe('a lock written in another PID namespace of this host', () => {
  it('is not taken over, though its pid is alive here with another start time', async () => {
    const dir = await tempDir();
    const repo = join(dir, 'repo');
    await initRepo(repo, 'dir');
    const disk = join(dir, 'disk.raw');
    await makeRaw(disk, 4 * MiB, [[0, 4096]]);
    const diskDir = join(repo, 'disks', 'vm');
    await mkdir(diskDir, { recursive: true });
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
    // pid 1 is alive here, but its start time is not the holder's: in one namespace, a reused pid.
    const holder = { pid: 1, host: hostname(), startedAt: 'then', command: 'prune', bootId, processStart: '1', pidNamespace: 'pid:[1]', token: '00112233' };
    await writeFile(join(diskDir, 'lock'), JSON.stringify(holder));
    const r = vhdvault('backup', repo, 'vm', '--source', disk);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/is locked by process 1 on host .* \(prune, since then\)/);
    expect(r.stderr).toContain(join(diskDir, 'lock'));
    expect(r.stderr).toContain(`vhdvault unlock ${repo} vm`);
    expect(JSON.parse(await readFile(join(diskDir, 'lock'), 'utf8'))).toEqual(holder);
    // A person who knows the holder is gone releases it; the next backup runs.
    const unlocked = vhdvault('unlock', repo, 'vm');
    expect(unlocked.code, unlocked.stderr).toBe(0);
    expect(unlocked.stdout).toMatch(/^unlocked vm: removed the lock of process 1 on host .* \(prune, since then\)$/m);
    const after = vhdvault('backup', repo, 'vm', '--source', disk);
    expect(after.code, after.stderr).toBe(0);
    expect(vhdvault('unlock', repo, 'vm').stderr).toBe(`vhdvault: ${diskDir}: is not locked, and no reader or writer left a registration\n`);
    // A lock whose holder runs here (this very test process) is not removed by unlock.
    const me = { ...holder, pid: process.pid, processStart: processStartOf(process.pid), pidNamespace: readlinkSync('/proc/self/ns/pid') };
    await writeFile(join(diskDir, 'lock'), JSON.stringify(me));
    const refused = vhdvault('unlock', repo, 'vm');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/which is running: stop it, or let it finish, rather than unlock/);
    expect(JSON.parse(await readFile(join(diskDir, 'lock'), 'utf8'))).toEqual(me);
    // The same record from this namespace is a reused pid: taken over.
    const ours = readlinkSync('/proc/self/ns/pid');
    await writeFile(join(diskDir, 'lock'), JSON.stringify({ ...holder, pidNamespace: ours }));
    const again = vhdvault('backup', repo, 'vm', '--source', disk);
    expect(again.code, again.stderr).toBe(0);
  });
});

describe('a takeover marker a killed process left', () => {
  it('is removed by the next writer that takes the lock, though no takeover is needed then', async () => {
    const dir = await tempDir();
    const repo = join(dir, 'repo');
    await initRepo(repo, 'dir');
    const disk = join(dir, 'disk.raw');
    await makeRaw(disk, 4 * MiB, [[0, MiB]]);
    const diskDir = join(repo, 'disks', 'vm');
    await mkdir(diskDir, { recursive: true });
    // Killed mid-takeover: its marker names this host, boot and namespace, and a pid no longer running.
    const dead = {
      pid: 2 ** 22 + 4242,
      host: hostname(),
      startedAt: new Date().toISOString(),
      command: 'backup',
      bootId: readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(),
      pidNamespace: readlinkSync('/proc/self/ns/pid'),
      token: 'deaddeaddeaddead',
    };
    await writeFile(join(diskDir, 'lock.takeover'), JSON.stringify(dead));
    const r = vhdvault('backup', repo, 'vm', '--source', disk);
    expect(r.code, r.stderr).toBe(0);
    expect(existsSync(join(diskDir, 'lock.takeover'))).toBe(false);
  });
});
