/**
 * The job demo: a scheduled job as `vhdvault job run` runs it, four times in
 * a row. Two small disks, a job file as a user writes it (docs/jobs.md),
 * a few writes to the disks between runs, each run's summary, the
 * history the repository keeps, and then every backup left in both
 * repositories after retention and replication, restored and compared with
 * its disk as it was when its run started (nothing writes to the disks
 * during a run, so that copy is what the backup must hold).
 */
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes, randomInt } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, sep } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { describeHistory } from '../jobs/history.js';
import { loadJob } from '../jobs/jobFile.js';
import { runJob } from '../jobs/runJob.js';
import { describeRun, loadRunReports } from '../jobs/runReport.js';
import { humanInZone, nextRun, scheduleZone } from '../jobs/schedule.js';
import { describeFinding, listBackups } from '../store/list.js';
import { Repository } from '../store/repository.js';
import { restore } from '../store/restore.js';
import { MiB } from './offline.js';

const DISKS = [
  { name: 'vm1-d1', size: 16 * MiB },
  { name: 'vm1-d2', size: 8 * MiB },
];
const RUNS = 4;
/** What changes on each disk between two runs: a few scattered 64 KiB writes. */
const PIECE = 64 * 1024;
const PIECES = 3;

/** The example of docs/jobs.md, scaled down; relative paths are read from the job file's folder. */
function jobFile(healthCheck: boolean): string {
  return `name: demo
schedule: "0 3 * * *"
repository: main
concurrency: 2
fullInterval: 2
disks:
${DISKS.map((d) => `  - name: ${d.name}\n    source: ${d.name}.raw\n`).join('')}retention:
  keepLast: 2
verify: new
healthCheck: ${healthCheck}
replicate:
  repository: offsite
  retention:
    keepLast: 3
`;
}

async function sha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(path), hash);
  return hash.digest('hex');
}

async function scribble(path: string, size: number): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    for (let i = 0; i < PIECES; i++) await fh.write(randomBytes(PIECE), 0, PIECE, randomInt(size / PIECE) * PIECE);
  } finally {
    await fh.close();
  }
}

const yesNo = (ok: boolean) => (ok ? 'yes' : 'NO');
const indent = (lines: string[]) => lines.map((line) => (line ? `  ${line}` : line)).join('\n');

export async function jobDemo(keep: boolean): Promise<void> {
  const started = performance.now();
  const work = await mkdtemp(join(tmpdir(), 'vhdvault-demo-job-'));
  // Ctrl-C stops the run (its backups, in child processes, unwind) and the checks; the folder still goes.
  const stop = new AbortController();
  const interrupted = () => {
    stop.abort();
    console.error('\ninterrupted: stopping the job run');
  };
  process.once('SIGINT', interrupted);
  // Report lines name the repositories by absolute path: inside the demo's folder the name is enough.
  const short = (line: string) => line.replaceAll(work + sep, '');
  try {
    for (const d of DISKS) await writeFile(join(work, `${d.name}.raw`), randomBytes(d.size));
    const main = await Repository.init(join(work, 'main'), { layout: 'dir', compression: 'gzip' });
    const offsite = await Repository.init(join(work, 'offsite'), { layout: 'vhd', compression: 'none' });
    // The health check has qemu-img read the restored VHD: without it, every run would fail.
    const qemuImg = spawnSync('qemu-img', ['--version']).status === 0;
    const file = join(work, 'demo.yaml');
    await writeFile(file, jobFile(qemuImg));
    const job = await loadJob(file);

    const next = nextRun(job);
    console.log(`vhdvault job demo — a scheduled job over two raw disks of random data (${DISKS.map((d) => `${d.name} ${d.size / MiB} MiB`).join(', ')}),`);
    console.log('backed up into repository main (dir layout, gzip) and replicated to offsite (vhd layout); its job file, demo.yaml:\n');
    console.log(indent(jobFile(qemuImg).trimEnd().split('\n')));
    if (!qemuImg) console.log('  (healthCheck off: qemu-img not found)');
    console.log(`\n\`vhdvault daemon demo.yaml\` would run it next on ${next ? humanInZone(next, scheduleZone(job)) : 'never'}; here it runs ${RUNS} times in a row,`);
    console.log(`as \`vhdvault job run demo.yaml\` does, with ${PIECES} random ${PIECE / 1024} KiB writes on each disk between runs:\n`);

    // `disk@id` → the sha256 of the disk just before the run that made that backup, and that run's number.
    const expected = new Map<string, { sha: string; run: number }>();
    let runsOk = true;
    for (let n = 1; n <= RUNS && !stop.signal.aborted; n++) {
      if (n > 1) for (const d of DISKS) await scribble(join(work, `${d.name}.raw`), d.size);
      const before = new Map<string, string>();
      for (const d of DISKS) before.set(d.name, await sha256(join(work, `${d.name}.raw`)));
      const report = await runJob(job, { signal: stop.signal });
      for (const d of report.disks) if (d.id) expected.set(`${d.disk}@${d.id}`, { sha: before.get(d.disk)!, run: n });
      runsOk &&= report.ok;
      console.log(indent(describeRun(report).map(short)));
    }
    if (stop.signal.aborted) {
      process.exitCode = 130;
      return;
    }

    console.log('\njob history (from the run reports kept in main):\n');
    console.log(indent(describeHistory(await loadRunReports(main, 'demo'))));

    console.log('\nevery backup left after retention, restored as raw and compared with its disk when its run started:\n');
    console.log('  repository  disk    from runs                         restores exactly');
    let restoresOk = true;
    for (const [name, repo] of [['main', main], ['offsite', offsite]] as const) {
      const listing = await listBackups(repo);
      const failures: string[] = [];
      for (const d of DISKS) {
        const backups = listing.backups.filter((b) => b.disk === d.name);
        const runs: string[] = [];
        let matching = 0;
        for (const b of backups) {
          if (stop.signal.aborted) break;
          const out = join(work, `restored-${name}-${d.name}.raw`);
          const want = expected.get(`${d.name}@${b.id}`);
          try {
            await restore(repo, d.name, out, { backup: b.id, format: 'raw' });
            if (want !== undefined && (await sha256(out)) === want.sha) matching++;
          } catch (err) {
            // A backup that cannot be restored is a failed check, said with the others, not a crash.
            failures.push(`${d.name} backup ${b.id}: ${(err as Error).message}`);
          } finally {
            await rm(out, { force: true });
          }
          runs.push(`${want?.run ?? '?'} (${b.kind})`);
        }
        console.log(`  ${name.padEnd(10)}  ${d.name.padEnd(6)}  ${runs.join(', ').padEnd(32)}  ${matching} of ${backups.length}`);
        restoresOk &&= backups.length > 0 && matching === backups.length;
      }
      // What list would warn about (a file no backup accounts for, unreadable metadata) fails the check too.
      const problems = [...failures, ...listing.findings.map(describeFinding), ...listing.unreadable.map((u) => `${u.disk}: ${u.problem}`)];
      for (const p of problems) console.log(`    ${name}: ${short(p)}`);
      restoresOk &&= problems.length === 0;
    }
    if (stop.signal.aborted) {
      process.exitCode = 130;
      return;
    }
    console.log(`\nevery backup in main and offsite restores exactly: ${yesNo(restoresOk)}`);
    console.log(`all ${RUNS} runs ok: ${yesNo(runsOk)}`);
    console.log(`total ${((performance.now() - started) / 1000).toFixed(1)} s${keep ? `; files kept in ${work}` : ''}`);
    if (!runsOk || !restoresOk) process.exitCode = 1;
  } finally {
    process.removeListener('SIGINT', interrupted);
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}
