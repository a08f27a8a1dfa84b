// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * `vhdvault job run` through real cycles: a job over three disks (one failing
 * on purpose) run ten times with scribbles between runs, fullInterval 4,
 * retention, verify of what each run wrote, replication with its own
 * retention and the health check; after every run each backup left on either
 * repository restores exactly to the disk as it was when that run began.
 */
import { randomBytes } from 'node:crypto';
import { open, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { initRepo, listed } from './helpers/store.js';
import { hasQsd, run, startQsd } from './helpers/qsd.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 8 * MiB;
const dir = await tempDir('vhdvault-job-');
const repo = join(dir, 'main');
const offsite = join(dir, 'offsite');
await initRepo(repo, 'dir');
await initRepo(offsite, 'vhd'); // the other layout: replication rewrites deltas into it
const disks = ['alpha', 'beta'];
for (const d of disks) await makeRaw(join(dir, `${d}.raw`), SIZE, [[0, SIZE]]);

const jobFile = join(dir, 'nightly.yaml');
await writeFile(
  jobFile,
  `name: nightly
schedule: "0 3 * * *"
repository: main
concurrency: 2
fullInterval: 4
disks:
  - name: alpha
    source: alpha.raw
  - name: beta
    source: beta.raw
  - name: gamma
    source: gamma-is-missing.raw
retention:
  keepLast: 6
verify: new
healthCheck: true
replicate:
  repository: offsite
  retention:
    keepLast: 4
`,
);

/** Scribble `count` random 64 KiB pieces over a disk. */
async function scribble(disk: string, count: number): Promise<void> {
  const fh = await open(join(dir, `${disk}.raw`), 'r+');
  for (let i = 0; i < count; i++) await fh.write(randomBytes(64 * 1024), 0, 64 * 1024, Math.floor(Math.random() * (SIZE / (64 * 1024))) * 64 * 1024);
  await fh.close();
}

/** Restored in this process (a CLI start per backup would double the test's time; the CLI's restore has its own tests). */
async function restoredSha(root: string, disk: string, id: string): Promise<string> {
  const out = join(dir, `r-${disk}-${id}.raw`);
  await restore(await Repository.open(root), disk, out, { backup: id, format: 'raw' });
  const sha = await sha256(out);
  await rm(out);
  return sha;
}

interface RunReport {
  ok: boolean;
  runId: string;
  disks: Array<{ disk: string; ok: boolean; error?: string; id?: string; kind?: string; fullBecause?: string; bytesWritten?: number; boundingStage?: string }>;
  retention: { ok: boolean; removed: string[] };
  verify: { ok: boolean; mode: string; backups: number; blocks: number };
  replication: { ok: boolean; copied: number; full: number; bytesSent: number };
  healthCheck: { ok: boolean; checked: Array<{ disk: string; ok: boolean }> };
  boundingStage: string | null;
  stages: Record<string, { busyMs: number }>;
}

describe('job run', () => {
  it('ten runs over three disks, one failing: fullInterval, retention, verify, replication and health check as configured; everything restores', async () => {
    /** The disk's content when each backup was taken: every id ever made. */
    const content = new Map<string, string>();
    const kinds: string[] = [];
    for (let run = 1; run <= 10; run++) {
      const before = new Map<string, string>();
      for (const d of disks) before.set(d, await sha256(join(dir, `${d}.raw`)));
      const r = await vhdvaultAsync('job', 'run', jobFile, '--json');
      expect(r.code, r.stderr).toBe(1); // gamma fails every time
      const report = JSON.parse(r.stdout) as RunReport;
      const gamma = report.disks.find((d) => d.disk === 'gamma')!;
      expect(gamma.ok).toBe(false);
      expect(gamma.error).toMatch(/gamma-is-missing\.raw: no such file/);
      for (const d of disks) {
        const dr = report.disks.find((x) => x.disk === d)!;
        expect(dr.ok, `run ${run} ${d}: ${dr.error}`).toBe(true);
        content.set(dr.id!, before.get(d)!);
        if (d === 'alpha') kinds.push(dr.kind!);
        if (run > 1 && dr.kind === 'delta') expect(dr.bytesWritten!).toBeLessThanOrEqual(8 * BLOCK); // ≤ 8 scribbles' blocks
      }
      expect(['read', 'digest', 'compress', 'write', 'replicate']).toContain(report.boundingStage);
      const busiest = Object.entries(report.stages).sort((a, b) => b[1].busyMs - a[1].busyMs)[0]![0];
      expect(report.boundingStage).toBe(busiest);
      expect(report.verify).toMatchObject({ ok: true, mode: 'new', backups: 2 });
      expect(report.replication.ok).toBe(true);
      expect(report.healthCheck).toMatchObject({ ok: true, checked: [{ disk: 'alpha', ok: true }, { disk: 'beta', ok: true }] });
      // Retention on both sides, as configured.
      for (const d of disks) {
        expect((await listed(repo, d)).length).toBe(Math.min(run, 6));
        expect((await listed(offsite, d)).length).toBe(Math.min(run, 4));
      }
      // Every point left on either side restores to the disk as it was when its run began (checked twice to keep the test short).
      if (run === 5 || run === 10) {
        for (const root of [repo, offsite]) {
          for (const b of await listed(root)) expect(await restoredSha(root, b.disk, b.id), `run ${run}: ${root} ${b.disk}@${b.id}`).toBe(content.get(b.id));
        }
      }
      for (const d of disks) await scribble(d, 8);
    }
    // A full every 4th backup of a disk (retention merges never shorten a chain below that here).
    expect(kinds).toEqual(['full', 'delta', 'delta', 'delta', 'full', 'delta', 'delta', 'delta', 'full', 'delta']);
    // The reports stay in the repository, and history reads them.
    expect((await readdir(join(repo, 'jobs', 'nightly'))).filter((n) => n.endsWith('.json'))).toHaveLength(10);
    const h = await vhdvaultAsync('job', 'history', repo, '--json');
    expect(h.code, h.stderr).toBe(0);
    const history = JSON.parse(h.stdout) as { runs: RunReport[]; trends: Array<{ disk: string; runs: number; failed: number }> };
    expect(history.runs).toHaveLength(10);
    expect(history.trends.find((t) => t.disk === 'gamma')).toMatchObject({ runs: 10, failed: 10 });
    const text = vhdvault('job', 'history', repo, '--job', 'nightly');
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/nightly\/alpha: 10 runs, 0 failed; duration/);
  });

  it('a bad job file exits 2 with one line, and runs nothing', async () => {
    const bad = join(dir, 'bad.yaml');
    await writeFile(bad, 'name: bad\nschedule: "0 3 * * *"\nrepository: main\ndisks: []\n');
    const r = vhdvault('job', 'run', bad);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/bad\.yaml: disks/);
  });

  it('prints a summary a person can read: each disk, each step, the bounding stage', async () => {
    const r = await vhdvaultAsync('job', 'run', jobFile);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^job nightly run \S+ \(manual\): FAILED in [\d.]+ s, bounded by \w+/);
    expect(r.stdout).toMatch(/gamma\s+FAILED\s+.*gamma-is-missing\.raw/);
    expect(r.stdout).toMatch(/alpha\s+(full|delta)\s+read [\d.]+ MiB, wrote/);
    expect(r.stdout).toMatch(/replication: ok, to .*offsite/);
  });
});

describe.skipIf(!hasQsd)('job run over a running QEMU disk', () => {
  it('backs up a qemu-storage-daemon disk by QMP (fleecing, then direct mode), the second a delta from the first one\'s checkpoint', async () => {
    const qsd = await startQsd({ format: 'qcow2', size: 8 * MiB });
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${8 * MiB}`, qsd.guestUri]);
    await run('mkdir', ['-p', join(dir, 'fleece')]);
    const file = join(dir, 'live.yaml');
    const write = (fleecing: boolean) =>
      writeFile(file, `name: live\nschedule: "0 3 * * *"\nrepository: main\ndisks:\n  - name: guest\n    qmp: ${qsd.qmpSocket}\n    node: g0\n    qemuNbd: nbd+unix:///?socket=${qsd.nbdSocket}\n${fleecing ? '    fleecing: fleece\n' : ''}`);
    await write(true);
    const first = JSON.parse((await vhdvaultAsync('job', 'run', file, '--json')).stdout) as { ok: boolean; disks: Array<{ mode?: string; kind?: string; checkpoint?: string | null; id?: string; bytesRead?: number }> };
    expect(first).toMatchObject({ ok: true, disks: [{ mode: 'fleecing', kind: 'full', checkpoint: null }] });
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5b 0 64k`, qsd.guestUri]);
    await write(false);
    const second = JSON.parse((await vhdvaultAsync('job', 'run', file, '--json')).stdout) as typeof first;
    expect(second).toMatchObject({ ok: true, disks: [{ mode: 'direct', kind: 'delta', checkpoint: expect.stringMatching(new RegExp(`^vhdvault-[0-9a-f]{8}-${first.disks[0]!.id}$`)), bytesRead: 2 * MiB }] });
  });
});
