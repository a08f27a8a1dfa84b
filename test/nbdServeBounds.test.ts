/**
 * `vhdvault serve` under clients that never read their replies: the server's
 * memory stays bounded whatever they ask for, it serves a normal client
 * afterwards, and `--max-connections` refuses the client beyond it with a
 * line on stderr.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OptionReply } from '../src/nbd/constants.js';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { RawConnection } from './helpers/nbdRaw.js';
import { type Serving, startServe } from './helpers/serve.js';
import { backupOf, initRepo } from './helpers/store.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
/** What the server may reach, whatever the clients do (about 60 MiB of it is Node itself). */
const RSS_BOUND = 300 * MiB;
const dir = await tempDir();
const disk = join(dir, 'disk.raw');
const repo = join(dir, 'repo');

beforeAll(async () => {
  await initRepo(repo, 'dir');
  await makeRaw(disk, SIZE, [[0, SIZE]]);
  await backupOf(repo, 'vm', disk);
});

/** The process's resident memory now and at its peak (VmRSS, VmHWM). */
function memory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)![1]) * 1024;
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

/** CPU time the process used, in clock ticks (utime + stime, all its threads). */
function cpuTicks(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/**
 * Resolves once the process has done all it will: no CPU time used for a
 * second. (It then waits on clients that read nothing; a busy machine only
 * delays this.)
 */
async function quiet(pid: number): Promise<void> {
  let last = cpuTicks(pid);
  for (let still = 0; still < 5; ) {
    await new Promise((r) => setTimeout(r, 200));
    const now = cpuTicks(pid);
    still = now === last ? still + 1 : 0;
    last = now;
  }
}

describe('clients that never read their replies', () => {
  let serving: Serving;
  const socket = join(dir, 'bounds.sock');
  beforeAll(async () => {
    serving = await startServe(repo, 'vm', '--socket', socket);
    // Read once, as any client would first: a verified block is then read in place, into a buffer of its own per request.
    await run('nbdcopy', [serving.uri, join(dir, 'first.raw')]);
  });
  afterAll(async () => {
    expect(await serving.stop()).toBe(0);
  });

  for (const count of [1, 3]) {
    it(`${count} client(s) asking 64 READs of 32 MiB each: the server stays under ${RSS_BOUND / MiB} MiB`, async () => {
      const pid = serving.child.pid!;
      const clients: RawConnection[] = [];
      for (let i = 0; i < count; i++) {
        const c = await RawConnection.open(socket);
        await c.greet();
        expect((await c.go()).type).toBe(OptionReply.ACK);
        c.socket.pause(); // nothing more is read: replies pile up on the server's side
        c.sendReads(Array.from({ length: 64 }, (_, n): [number, number] => [(n % 2) * 32 * MiB, 32 * MiB]));
        clients.push(c);
      }
      await quiet(pid);
      const held = memory(pid);
      for (const c of clients) c.socket.destroy();
      expect(held.peak, `peak RSS ${Math.round(held.peak / MiB)} MiB`).toBeLessThan(RSS_BOUND);
      console.log(`${count} client(s): peak ${Math.round(held.peak / MiB)} MiB, now ${Math.round(held.rss / MiB)} MiB`);
      // What they left is let go: a normal client gets the whole disk, exactly.
      const out = join(dir, `after-${count}.raw`);
      await run('nbdcopy', [serving.uri, out]);
      expect(await sameBytes(out, disk)).toBe(true);
      expect(memory(pid).rss).toBeLessThan(RSS_BOUND);
    });
  }
});

describe('--max-connections', () => {
  it('refuses the client beyond it at GO, with the reason, and says so on stderr', async () => {
    const socket = join(dir, 'limit.sock');
    const serving = await startServe(repo, 'vm', '--socket', socket, '--max-connections', '2');
    try {
      const open = async () => {
        const c = await RawConnection.open(socket);
        await c.greet();
        return c;
      };
      const served = [await open(), await open()];
      for (const c of served) expect((await c.go()).type).toBe(OptionReply.ACK);
      const third = await open();
      const refused = await third.go();
      expect(refused.type).toBe(OptionReply.ERR_POLICY);
      expect(refused.message).toContain('--max-connections');
      // stderr is a pipe of its own: the line may come after the reply.
      const line = /^vhdvault: refused client on the Unix socket: 2 connections already established \(at most 2: --max-connections\)$/m;
      for (let waited = 0; !line.test(serving.stderr()) && waited < 10_000; waited += 20) await new Promise((r) => setTimeout(r, 20));
      expect(serving.stderr()).toMatch(line);
      for (const c of [...served, third]) c.socket.destroy();
    } finally {
      expect(await serving.stop()).toBe(0);
    }
  });

  it('is in --help, and must be a whole number of at least 1: else one line and exit 2', async () => {
    expect((await vhdvaultAsync('serve', '--help')).stdout).toMatch(/--max-connections <n>\s+clients served at once/);
    for (const bad of ['0', '-1', 'many', '2.5']) {
      const r = await vhdvaultAsync('serve', repo, 'vm', '--socket', join(dir, 'never.sock'), '--max-connections', bad);
      expect(r.code).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain('--max-connections');
    }
  });
});
