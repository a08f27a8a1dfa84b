/**
 * The dashboard over HTTP (`ui`, `daemon --http`), against repositories real
 * job runs filled: what the overview says of each disk, the run page's stage
 * bars, `/metrics` parsed as Prometheus text and checked against the run
 * reports, "run now" on a daemon, and the access rules (token, loopback,
 * foreign Host, sizes).
 */
import { writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectRefused, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { daemonDashboard, killUis, startUi } from './helpers/dashboard.js';
import { Daemon, killDaemons } from './helpers/daemon.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { initRepo } from './helpers/store.js';
import { Repository } from '../src/store/repository.js';
import { writeVmRecord } from '../src/store/vmRecord.js';
// @ts-expect-error: the package ships no types; its output is described below.
import parsePrometheus from 'parse-prometheus-text-format';

interface Family {
  name: string;
  type: string;
  metrics: Array<{ value: string; labels?: Record<string, string> }>;
}

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-dashboard-');
const repo = join(dir, 'repo');
const jobFile = join(dir, 'nightly.yaml');
const slowJob = join(dir, 'slow.yaml');
const token = 'a-token-of-thirty-two-characters';
const tokenFile = join(dir, 'token');

afterAll(() => {
  killDaemons();
  killUis();
});

beforeAll(async () => {
  await initRepo(repo, 'dir');
  await makeRaw(join(dir, 'alpha.raw'), 8 * MiB, [[0, 8 * MiB]]);
  await makeRaw(join(dir, 'big.raw'), 48 * MiB, [[0, 48 * MiB]]);
  await writeFile(tokenFile, `${token}\n`);
  await writeFile(jobFile, 'name: nightly\nschedule: "0 3 * * *"\nrepository: repo\ndisks:\n  - name: alpha\n    source: alpha.raw\n  - name: gamma\n    source: gamma-is-missing.raw\nverify: new\n');
  // Read at 8 MiB/s: a run of several seconds, long enough to be seen running.
  await writeFile(slowJob, 'name: slow\nschedule: "0 4 1 1 *"\nrepository: repo\nmaxRead: 8MiB\ndisks:\n  - name: big\n    source: big.raw\n');
  for (let i = 0; i < 2; i++) await vhdvaultAsync('job', 'run', jobFile);
}, 120_000);

/** `vhdvault ui …` on a free port; resolves to its base URL once it listens. */

const text = async (url: string, init: RequestInit = {}) => {
  const r = await fetch(url, init);
  return { status: r.status, body: await r.text(), headers: r.headers };
};
/** fetch sets Host itself: node:http lets a test send another, as a DNS-rebound name would arrive. */
function statusWithHost(url: string, host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers: { Host: host } }, (res) => {
      res.resume();
      resolve(res.statusCode!);
    });
    req.on('error', reject);
    req.end();
  });
}
const visible = (htmlText: string) => htmlText.replace(/<script[\s\S]*?<\/script>/g, '').replace(/<[^>]+>/g, ' ').replace(/\s+/g, ' ');

describe('vhdvault ui on a repository two job runs filled', () => {
  let base = '';
  beforeAll(async () => {
    base = await startUi(jobFile, '--http', '127.0.0.1:0');
  });

  it('the overview shows each disk: protected with its age, failed with its reason; the job and the repository', async () => {
    const { status, body } = await text(`${base}/`);
    expect(status).toBe(200);
    const seen = visible(body);
    expect(seen).toMatch(/alpha nightly protected delta \d{8}T\d{9}Z-[0-9a-f]{6} \d+ s ago/);
    expect(seen).toMatch(/gamma nightly failed — — — failed : \S*gamma-is-missing\.raw: no such file or directory/);
    expect(seen).toMatch(/nightly 0 3 \* \* \* \S+ failed , /);
    expect(seen).toContain('2 (2 failed)');
    expect(seen).toContain(repo);
  });

  it('a run page bars each disk\'s stages and marks the bounding one', async () => {
    const doc = (await (await fetch(`${base}/api/dashboard`)).json()) as { format: string; jobs: Array<{ lastRun: { runId: string } }> };
    expect(doc.format).toBe('vhdvault-dashboard/1');
    const runId = doc.jobs[0]!.lastRun.runId;
    const report = (await (await fetch(`${base}/api/runs/nightly/${runId}`)).json()) as { format: string; disks: Array<{ disk: string; boundingStage?: string }> };
    expect(report.format).toBe('vhdvault-job-run/2');
    const { body } = await text(`${base}/jobs/nightly/runs/${runId}`);
    const bounding = report.disks.find((d) => d.disk === 'alpha')!.boundingStage!;
    expect(body).toMatch(new RegExp(`<span class="stage ${bounding} bounding"[^>]*>${bounding} ◆</span>`));
    expect(visible(body)).toMatch(/gamma failed \S*gamma-is-missing\.raw/);
  });

  it('/metrics parses as Prometheus text, and its figures are the run reports\'', async () => {
    const { status, body, headers } = await text(`${base}/metrics`);
    expect(status).toBe(200);
    expect(headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const families = parsePrometheus(body) as Family[];
    const metric = (name: string, disk?: string) => families.find((f) => f.name === name)?.metrics.find((m) => disk === undefined || m.labels?.disk === disk);
    const history = JSON.parse(vhdvault('job', 'history', repo, '--json').stdout) as { runs: Array<{ disks: Array<{ disk: string; ok: boolean; bytesRead?: number; durationMs: number }> }> };
    const last = (disk: string) => history.runs.at(-1)!.disks.find((d) => d.disk === disk)!;
    expect(Number(metric('vhdvault_disk_last_run_read_bytes', 'alpha')!.value)).toBe(last('alpha').bytesRead);
    expect(Number(metric('vhdvault_disk_last_run_duration_seconds', 'alpha')!.value)).toBeCloseTo(last('alpha').durationMs / 1000, 3);
    expect(metric('vhdvault_disk_last_run_success', 'alpha')!.value).toBe('1');
    expect(metric('vhdvault_disk_last_run_success', 'gamma')!.value).toBe('0');
    const states = families.find((f) => f.name === 'vhdvault_disk_state')!.metrics.filter((m) => m.value === '1').map((m) => `${m.labels!.disk}=${m.labels!.state}`);
    expect(states.sort()).toEqual(['alpha=ok', 'gamma=failed']);
    expect(families.find((f) => f.name === 'vhdvault_job_runs_total')!.type).toBe('COUNTER');
    expect(metric('vhdvault_job_runs_total')!.value).toBe('2');
    expect(metric('vhdvault_job_failed_runs_total')!.value).toBe('2');
    const list = JSON.parse(vhdvault('list', repo, '--json').stdout) as { backups: Array<{ bytesStored: number }> };
    expect(Number(metric('vhdvault_repository_stored_bytes')!.value)).toBe(list.backups.reduce((a, b) => a + b.bytesStored, 0));
    expect(families.some((f) => f.name === 'vhdvault_process_resident_memory_bytes')).toBe(true);
  });

  it('serves its assets itself, and nothing from a path', async () => {
    expect((await text(`${base}/assets/uPlot.iife.min.js`)).body).toContain('uPlot');
    expect((await text(`${base}/assets/style.css`)).status).toBe(200);
    for (const path of ['/assets/..%2Fpackage.json', '/assets/%2e%2e%2f%2e%2e%2fetc%2fpasswd', '/disks/0/..%2F..%2Fvhdvault.json', '/jobs/..%2F..%2Fetc/runs/x']) {
      const r = await text(`${base}${path}`);
      expect(r.status, path).toBe(404);
      expect(r.body).not.toContain('root:');
    }
    expect((await text(`${base}/disks/0/%E0%A4%A`)).status).toBe(400);
  });

  it('answers only to a loopback Host without a token; writes nothing: "run now" is the daemon\'s', async () => {
    expect(await statusWithHost(`${base}/`, 'rebound.example.com')).toBe(421);
    expect(await statusWithHost(`${base}/`, 'localhost')).toBe(200);
    const post = await text(`${base}/api/jobs/nightly/run`, { method: 'POST' });
    expect(post.status).toBe(409);
    expect(JSON.parse(post.body).error).toMatch(/vhdvault ui.*schedules nothing/);
    expect((await text(`${base}/api/dashboard`, { method: 'DELETE' })).status).toBe(405);
  });
});

describe('a disk whose job\'s schedule fired since its newest backup', () => {
  it('is late, in the page and in /metrics', async () => {
    // Every second: the schedule last fired less than a second ago, after alpha's backups of the beforeAll.
    const lateJob = join(dir, 'late.yaml');
    await writeFile(lateJob, 'name: late\nschedule: "* * * * * *"\nrepository: repo\ndisks:\n  - name: alpha\n    source: alpha.raw\n');
    const base = await startUi(lateJob, '--http', '127.0.0.1:0');
    const doc = (await (await fetch(`${base}/api/dashboard`)).json()) as { disks: Array<{ disk: string; job: string; state: string }> };
    expect(doc.disks.find((d) => d.disk === 'alpha')).toMatchObject({ job: 'late', state: 'late' });
    expect(visible((await text(`${base}/`)).body)).toMatch(/alpha late late delta/);
    const families = parsePrometheus((await text(`${base}/metrics`)).body) as Family[];
    const on = families.find((f) => f.name === 'vhdvault_disk_state')!.metrics.filter((m) => m.value === '1').map((m) => `${m.labels!.disk}=${m.labels!.state}`);
    // gamma, which no job given here names, keeps the failure of its last run (in nightly).
    expect(on.sort()).toEqual(['alpha=late', 'gamma=failed']);
  });
});

describe('a VM backup', () => {
  it('has a page: its backups, how each was made consistent, its disks\' backups and the commands to restore and boot it', async () => {
    const vmRepo = join(dir, 'vm-repo');
    await initRepo(vmRepo, 'dir');
    const disks: Record<string, string> = {};
    for (const target of ['vda', 'vdb']) {
      const r = await vhdvaultAsync('backup', vmRepo, `web.${target}`, '--source', join(dir, 'alpha.raw'), '--json');
      disks[target] = (JSON.parse(r.stdout) as { id: string }).id;
    }
    const definition = { kind: 'qemu' as const, machine: 'pc', memoryMiB: 256, cpus: 1, kernel: null, initrd: null, append: null, disks: [], agent: true };
    const id = disks.vdb!;
    await writeVmRecord(await Repository.open(vmRepo), { format: 1, vm: 'web', id, createdAt: new Date().toISOString(), disks, quiesced: true, frozenMs: 42, pausedMs: null, checkpoint: null, definition });
    const base = await startUi(vmRepo, '--http', '127.0.0.1:0');
    const overview = await text(`${base}/`);
    expect(overview.body).toContain('<a href="/vms/0/web">web</a>');
    const { status, body } = await text(`${base}/vms/0/web`);
    expect(status).toBe(200);
    const seen = visible(body);
    expect(seen).toContain(`VM web In ${vmRepo} : 1 VM backup.`);
    expect(seen).toMatch(new RegExp(`${id} · quiesced \\(frozen 42 ms\\) · QEMU vda ${disks.vda} vdb ${disks.vdb}`));
    expect(seen).toContain(`vhdvault vm restore ${vmRepo} web web-restored --backup ${id}`);
    expect(seen).toContain(`vhdvault vm boot-check ${vmRepo} web --backup ${id}`);
    expect((await text(`${base}/vms/0/nope`)).status).toBe(404);
    expect((await text(`${base}/vms/0/..%2F..%2Fvhdvault.json`)).status).toBe(404);
  });
});

describe('the token', () => {
  it('listening beyond loopback without one is refused before anything listens (exit 2)', () => {
    const r = vhdvault('ui', repo, '--http', '0.0.0.0:0');
    expect(r.code).toBe(2);
    expect(r.stderr).toBe('vhdvault: --http 0.0.0.0:0: listening beyond this host (not a loopback address) needs --token-file\n');
  });

  it('with one, every route answers 401 without it or with another; a browser gives it once through the form', async () => {
    const base = await startUi(repo, '--http', '127.0.0.1:0', '--token-file', tokenFile);
    for (const path of ['/', '/metrics', '/assets/style.css', '/api/dashboard', '/trends', '/nope']) {
      expect((await text(`${base}${path}`)).status, path).toBe(401);
      expect((await text(`${base}${path}`, { headers: { Authorization: 'Bearer not-the-token-at-all' } })).status, path).toBe(401);
    }
    expect((await text(`${base}/metrics`, { headers: { Authorization: `Bearer ${token}` } })).status).toBe(200);
    const ask = await text(`${base}/`, { headers: { Accept: 'text/html' } });
    expect(ask.body).toContain('<form method="post" action="/login">');
    const wrong = await fetch(`${base}/login`, { method: 'POST', body: new URLSearchParams({ token: 'nope' }), redirect: 'manual', headers: { Accept: 'text/html' } });
    expect(wrong.status).toBe(401);
    const login = await fetch(`${base}/login`, { method: 'POST', body: new URLSearchParams({ token }), redirect: 'manual' });
    expect(login.status).toBe(303);
    const cookie = login.headers.get('set-cookie')!.split(';')[0]!;
    expect((await text(`${base}/`, { headers: { Cookie: cookie } })).status).toBe(200);
    const big = await text(`${base}/login`, { method: 'POST', body: 'token='.padEnd(10_000, 'x') });
    expect(big.status).toBe(413);
  });

  it('a token file with a short token is one line, exit 1', async () => {
    const short = join(dir, 'short-token');
    await writeFile(short, 'abc\n');
    const r = vhdvault('ui', repo, '--http', '127.0.0.1:0', '--token-file', short);
    expectRefused(r, short, /the token must be at least 16 characters/);
    expect(r.code).toBe(1);
  });
});

describe('daemon --http', () => {
  it('"run now" starts a run the overview shows running with its progress; a second is refused while it goes; the page shows it done', async () => {
    const d = new Daemon(slowJob, '--http', '127.0.0.1:0');
    const base = await daemonDashboard(d);
    const before = (await (await fetch(`${base}/api/dashboard`)).json()) as { jobs: Array<{ name: string; runs: number }> };
    expect(before.jobs.find((j) => j.name === 'slow')!.runs).toBe(0);
    const started = await fetch(`${base}/api/jobs/slow/run`, { method: 'POST' });
    expect(started.status).toBe(202);
    const during = (await (await fetch(`${base}/api/dashboard`)).json()) as { jobs: Array<{ name: string; running: unknown }>; disks: Array<{ disk: string; state: string }> };
    expect(during.jobs.find((j) => j.name === 'slow')!.running).not.toBeNull();
    expect(during.disks.find((x) => x.disk === 'big')!.state).toBe('running');
    const again = await fetch(`${base}/api/jobs/slow/run`, { method: 'POST' });
    expect(again.status).toBe(409);
    expect(((await again.json()) as { error: string }).error).toMatch(/^slow is running \(since .*\): one run of a job at a time$/);
    const foreign = await fetch(`${base}/api/jobs/slow/run`, { method: 'POST', headers: { Origin: 'http://evil.example' } });
    expect(foreign.status).toBe(403);
    await d.waitFor((e) => e.event === 'finished' && e.job === 'slow');
    let after: { disks: Array<{ disk: string; state: string }> } = { disks: [] };
    for (let i = 0; i < 50 && after.disks.find((x) => x.disk === 'big')?.state !== 'ok'; i++) {
      await new Promise((r) => setTimeout(r, 200));
      after = (await (await fetch(`${base}/api/dashboard`)).json()) as typeof after;
    }
    expect(after.disks.find((x) => x.disk === 'big')!.state).toBe('ok');
    d.signal('SIGTERM');
    expect(await d.exited).toBe(0);
  }, 120_000);

  it('clients that send their headers a byte a second neither stall a run nor stay connected after 10 s', async () => {
    const d = new Daemon(slowJob, '--http', '127.0.0.1:0');
    const base = await daemonDashboard(d);
    const { hostname, port } = new URL(base);
    const closed: number[] = [];
    const opened = performance.now();
    const slow: Socket[] = [];
    const timers: NodeJS.Timeout[] = [];
    for (let i = 0; i < 40; i++) {
      const socket = connect(Number(port), hostname);
      socket.on('error', () => undefined);
      socket.once('close', () => closed.push(performance.now() - opened));
      socket.write(`GET / HTTP/1.1\r\nHost: ${hostname}\r\nX-Slow: `);
      timers.push(setInterval(() => socket.writable && socket.write('x'), 1000));
      slow.push(socket);
    }
    try {
      const from = d.events.length;
      expect((await fetch(`${base}/api/jobs/slow/run`, { method: 'POST' })).status).toBe(202);
      const done = await d.waitFor((e) => e.event === 'finished' && e.job === 'slow', from);
      expect(d.events[done]!.message).toMatch(/^slow: run \S+ ok in /);
      expect((await fetch(`${base}/api/dashboard`)).status).toBe(200);
      for (let i = 0; i < 100 && closed.length < slow.length; i++) await new Promise((r) => setTimeout(r, 200));
      // They would trickle forever: the server closed each (headersTimeout, 10 s).
      expect(closed).toHaveLength(slow.length);
      expect(Math.min(...closed)).toBeGreaterThan(9_000);
    } finally {
      for (const t of timers) clearInterval(t);
      for (const s of slow) s.destroy();
    }
    d.signal('SIGTERM');
    expect(await d.exited).toBe(0);
  }, 120_000);
});
