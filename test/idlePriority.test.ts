/**
 * --idle-priority: every thread of the backup runs under SCHED_IDLE (read
 * from /proc while it runs, the worker pool's threads included), the backup
 * is whole, and where a guest's writes would wait for the backup (direct
 * mode) the option is refused before anything is done.
 */
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { beforeAll, describe, expect, it } from 'vitest';
import { isIdlePolicy, threadPolicies } from '../src/util/priority.js';
import { CLI, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';

const MiB = 1024 * 1024;

interface Sampled {
  code: number;
  stderr: string;
  /** The policies of every thread, at each sample taken while it ran. */
  samples: number[][];
}

/** Run the CLI, sampling its threads' policies every 50 ms until it exits. */
async function runSampled(...args: string[]): Promise<Sampled> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: cliEnv() });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  let exited = false;
  const done = new Promise<number>((resolve) => child.once('exit', (code) => ((exited = true), resolve(code ?? -1))));
  const samples: number[][] = [];
  while (!exited) {
    const p = await threadPolicies(child.pid!).catch(() => null); // gone between the check and the read
    if (p) samples.push(p);
    await sleep(50);
  }
  return { code: await done, stderr, samples };
}

describe('backup --idle-priority', () => {
  let dir: string;
  let repo: string;
  let source: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-idle-');
    repo = join(dir, 'repo');
    source = join(dir, 'disk.raw');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
    await makeRaw(source, 8 * MiB, [[0, 8 * MiB]]);
  });

  it('runs every thread under SCHED_IDLE from then on, and the backup is whole', async () => {
    // About 4 s at 2 MiB/s: long enough to watch, the pool's threads started within the first block.
    const r = await runSampled('backup', repo, 'idle', '--source', source, '--idle-priority', '--max-read', '2M');
    expect(r.code, r.stderr).toBe(0);
    const all = r.samples.filter((p) => p.every(isIdlePolicy));
    expect(all.length, `samples: ${JSON.stringify(r.samples)}`).toBeGreaterThan(10);
    // Once every thread was idle, every later sample is: new threads (workers, libuv's) inherit it.
    const first = r.samples.findIndex((p) => p.every(isIdlePolicy));
    for (const p of r.samples.slice(first)) expect(p.every(isIdlePolicy), JSON.stringify(p)).toBe(true);
    expect((await vhdvaultAsync('verify', repo, 'idle')).code).toBe(0);
    const out = join(dir, 'idle.raw');
    expect((await vhdvaultAsync('restore', repo, 'idle', out)).code).toBe(0);
    expect((await readFile(out)).equals(await readFile(source))).toBe(true);
  });

  // Deterministic where sampling from outside is not: whether the pool started before or after a sample is timing.
  it('a thread started after it (a worker, as the pool starts) inherits SCHED_IDLE', async () => {
    const module = fileURLToPath(new URL('../dist/src/util/priority.js', import.meta.url));
    const program = [
      `const { enterIdlePriority } = await import(${JSON.stringify(module)});`,
      "const { Worker } = await import('node:worker_threads');",
      'await enterIdlePriority();',
      "const w = new Worker(\"Promise.all([import('node:fs'), import('node:worker_threads')]).then(([fs, wt]) => { const s = fs.readFileSync('/proc/thread-self/stat', 'utf8'); wt.parentPort.postMessage(Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[38])); });\", { eval: true });",
      "w.once('message', (policy) => { console.log(policy); w.terminate(); });",
    ].join('\n');
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', program], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(isIdlePolicy(Number(r.stdout.trim())), r.stdout).toBe(true);
  });

  it('without it, the threads keep the normal policy (what the test above tells apart)', async () => {
    const r = await runSampled('backup', repo, 'normal', '--source', source, '--max-read', '8M');
    expect(r.code, r.stderr).toBe(0);
    expect(r.samples.length).toBeGreaterThan(0);
    for (const p of r.samples) expect(p.every((x) => x === 0)).toBe(true);
  });

  it('is refused where the guest waits for the backup (direct mode), exit 2, before anything is done', async () => {
    const live = await vhdvaultAsync('backup', repo, 'guest', '--qemu', join(dir, 'no-qmp.sock'), '--node', 'g0', '--idle-priority');
    expect(live.code).toBe(2);
    expect(live.stderr.trim()).toBe("vhdvault: --idle-priority with --qemu needs --fleecing: in direct mode the guest's writes wait for the backup's copies, which must not wait for spare CPU");
    const vm = await vhdvaultAsync('vm', 'backup', repo, 'web', '--qemu', join(dir, 'no-qmp.sock'), '--idle-priority');
    expect(vm.code).toBe(2);
    expect(vm.stderr.trim()).toBe(live.stderr.trim());
  });
});
