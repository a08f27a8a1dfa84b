/**
 * Everything keeps working on an encrypted repository, through the CLI:
 * replication between encrypted repositories with different passwords (the
 * destination re-encrypts and recomputes its keyed digests) and to a plain
 * one, serve (decrypting on read, with a writable overlay), a scheduled job
 * whose password comes from a command, and what is refused (direct mode, the
 * vhd tools on a sealed directory).
 */
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectRefused, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { hasQemuNbd } from './helpers/nbdTools.js';
import { startServe } from './helpers/serve.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
process.env.VHDVAULT_TEST_SCRYPT_N = '1024';

const dir = await tempDir('vhdvault-encuse-');
afterAll(() => rm(dir, { recursive: true, force: true }));

/** Run the CLI with these passwords in its environment (and no other). */
function withPasswords(env: Record<string, string>, ...args: string[]) {
  const saved = { ...process.env };
  for (const k of Object.keys(process.env)) if (k.startsWith('VHDVAULT_') && k.includes('PASSWORD')) delete process.env[k];
  Object.assign(process.env, env);
  try {
    return vhdvault(...args);
  } finally {
    process.env = saved;
  }
}

const ok = (r: { code: number; stdout: string; stderr: string }) => {
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  return r;
};

/** Overwrite `count` random 64 KiB pieces of the disk. */
async function scribble(path: string, count: number): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    for (let i = 0; i < count; i++) await fh.write(randomBytes(64 * 1024), 0, 64 * 1024, Math.floor(Math.random() * (SIZE / (64 * 1024))) * 64 * 1024);
  } finally {
    await fh.close();
  }
}

describe('an encrypted repository in use', () => {
  const disk = join(dir, 'd.raw');
  const [a, b, plain] = [join(dir, 'a'), join(dir, 'b'), join(dir, 'plain')];
  const A = { VHDVAULT_PASSWORD: 'password of a' };
  const B = { VHDVAULT_PASSWORD: 'password of b' };

  beforeAll(async () => {
    await makeRaw(disk, SIZE, [[0, 6 * MiB]]);
    ok(withPasswords(A, 'init', a, '--encryption', 'aes-256-gcm', '--compression', 'gzip'));
    ok(withPasswords(B, 'init', b, '--encryption', 'chacha20-poly1305'));
    ok(vhdvault('init', plain));
    ok(withPasswords(A, 'backup', a, 'd', '--source', disk));
  });

  it('replicates to a repository with another password, then a delta; both verify and restore exactly', async () => {
    const both = { ...A, VHDVAULT_TARGET_PASSWORD: B.VHDVAULT_PASSWORD };
    ok(withPasswords(both, 'replicate', a, b));
    await scribble(disk, 12);
    ok(withPasswords(A, 'backup', a, 'd', '--source', disk));
    const second = ok(withPasswords(both, 'replicate', a, b, '--json'));
    const report = JSON.parse(second.stdout) as { disks: Array<{ copied: Array<{ how: string }> }> };
    expect(report.disks[0]!.copied.map((c) => c.how)).toEqual(['delta']);
    ok(withPasswords(B, 'verify', b));
    const out = join(dir, 'from-b.raw');
    ok(withPasswords(B, 'restore', b, 'd', out));
    expect(await sha256(out)).toBe(await sha256(disk));
    // The destination's password alone does not open the source, nor the other way round.
    expectRefused(withPasswords(B, 'list', a), a, /wrong password/);
    expectRefused(withPasswords(A, 'list', b), b, /wrong password/);
    // With a password file for the destination instead of the variable.
    const file = join(dir, 'b.password');
    await writeFile(file, `${B.VHDVAULT_PASSWORD}\n`);
    ok(withPasswords(A, 'replicate', a, b, '--target-password-file', file));
    await rm(out);
  });

  it('replicates to a plain repository, whose digests are SHA-256 again', async () => {
    ok(withPasswords(A, 'replicate', a, plain));
    ok(vhdvault('verify', plain));
    const out = join(dir, 'from-plain.raw');
    ok(vhdvault('restore', plain, 'd', out));
    expect(await sha256(out)).toBe(await sha256(disk));
    // Plain digests are SHA-256: the plain copy's metadata says so, and the encrypted one's is sealed.
    const meta = JSON.parse(ok(vhdvault('list', plain, '--json')).stdout) as { backups: Array<{ id: string }> };
    const first = JSON.parse(await readFile(join(plain, 'disks', 'd', `${meta.backups[0]!.id}.json`), 'utf8')) as { digestAlgorithm: string };
    expect(first.digestAlgorithm).toBe('sha256');
    const sealed = await readFile(join(a, 'disks', 'd', `${meta.backups[0]!.id}.json`));
    expect(sealed.subarray(0, 4).toString('latin1')).toBe('VVE\x01');
    await rm(out);
  });

  it.skipIf(!hasQemuNbd)('serves a backup decrypted, and a writable overlay restores with its writes', async () => {
    process.env.VHDVAULT_PASSWORD = A.VHDVAULT_PASSWORD;
    try {
      const serving = await startServe(a, 'd', '--listen', '127.0.0.1:0');
      const out = join(dir, 'served.raw');
      expect(spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', serving.uri, out]).status).toBe(0);
      expect(await sha256(out)).toBe(await sha256(disk));
      expect(await serving.stop()).toBe(0);
      const overlay = join(dir, 'overlay');
      const writable = await startServe(a, 'd', '--listen', '127.0.0.1:0', '--writable', '--overlay', overlay);
      expect(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', writable.uri]).status).toBe(0);
      expect(spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', writable.uri, out]).status).toBe(0);
      expect(await writable.stop()).toBe(0);
      const restored = join(dir, 'with-overlay.raw');
      ok(vhdvault('restore', a, 'd', restored, '--from-overlay', overlay));
      expect(await sha256(restored)).toBe(await sha256(out));
      expect((await readFile(restored)).subarray(0, 4).toString('hex')).toBe('5a5a5a5a');
      await Promise.all([rm(out), rm(restored), rm(overlay, { recursive: true })]);
    } finally {
      delete process.env.VHDVAULT_PASSWORD;
    }
  });

  it('runs a job whose password comes from VHDVAULT_PASSWORD_COMMAND, with verify and retention', async () => {
    const job = join(dir, 'nightly.yaml');
    const j = join(dir, 'j');
    ok(withPasswords(A, 'init', j, '--encryption', 'aes-256-gcm', '--layout', 'objects'));
    await writeFile(job, `name: nightly\nschedule: "0 3 * * *"\nrepository: j\ndisks:\n  - name: d\n    source: d.raw\nretention:\n  keepLast: 2\nverify: new\n`);
    const command = { VHDVAULT_PASSWORD_COMMAND: `printf '%s\\n' '${A.VHDVAULT_PASSWORD}'` };
    for (let i = 0; i < 3; i++) {
      await scribble(disk, 4);
      ok(withPasswords(command, 'job', 'run', job));
    }
    const listing = JSON.parse(ok(withPasswords(A, 'list', j, 'd', '--json')).stdout) as { backups: unknown[] };
    expect(listing.backups).toHaveLength(2);
    ok(withPasswords(A, 'verify', j));
    const out = join(dir, 'after-job.raw');
    ok(withPasswords(A, 'restore', j, 'd', out));
    expect(await sha256(out)).toBe(await sha256(disk));
    await rm(out);
  });

  it('refuses direct mode, which would write plain copies into the repository', async () => {
    const r = await (async () => {
      process.env.VHDVAULT_PASSWORD = A.VHDVAULT_PASSWORD;
      try {
        return await vhdvaultAsync('backup', a, 'live', '--qemu', join(dir, 'no-such-qmp.sock'), '--node', 'disk0');
      } finally {
        delete process.env.VHDVAULT_PASSWORD;
      }
    })();
    expectRefused(r, a, /is encrypted, and direct mode would write the copies of old data into it unencrypted: give --fleecing/);
  });

  it('an init killed after its key file and before vhdvault.json: the next init goes on; anything else there is refused', async () => {
    const killed = join(dir, 'killed-init');
    const keyFile = (await readdir(join(a, 'keys'))).find((n) => n.endsWith('.json'))!;
    await mkdir(join(killed, 'keys'), { recursive: true });
    await copyFile(join(a, 'keys', keyFile), join(killed, 'keys', keyFile));
    await writeFile(join(killed, 'keys', `.${keyFile}.4242.0badcafe.tmp`), 'half a key file');
    ok(withPasswords(B, 'init', killed, '--encryption', 'aes-256-gcm'));
    expect(await readdir(join(killed, 'keys'))).not.toContain(keyFile);
    ok(withPasswords(B, 'list', killed));
    const other = join(dir, 'not-ours');
    await mkdir(join(other, 'keys'), { recursive: true });
    await writeFile(join(other, 'keys', 'notes.txt'), 'mine');
    expectRefused(withPasswords(B, 'init', other, '--encryption', 'aes-256-gcm'), other, /is not empty and is not a vhdvault repository/);
    expect(await readFile(join(other, 'keys', 'notes.txt'), 'utf8')).toBe('mine');
  });

  it('says a sealed VHD directory is sealed, rather than damaged, to the vhd tools', async () => {
    const listing = JSON.parse(ok(withPasswords(A, 'list', a, 'd', '--json')).stdout) as { backups: Array<{ id: string }> };
    const data = join(a, 'disks', 'd', `${listing.backups.at(-1)!.id}.vhd-dir`);
    expectRefused(vhdvault('vhd', 'info', data), data, /is part of the encrypted repository .*: its files are sealed/);
    // Copied out of the repository, the directory still says what it is.
    const copy = join(dir, 'copied.vhd-dir');
    expect(spawnSync('cp', ['-r', data, copy]).status).toBe(0);
    expectRefused(vhdvault('vhd', 'info', copy), copy, /is sealed: it belongs to an encrypted repository/);
  });
});
