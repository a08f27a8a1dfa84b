import { Command } from 'commander';
import type { Job, JobDisk } from '../jobs/jobFile.js';
import { checkDiskName } from '../store/names.js';
import { Repository } from '../store/repository.js';
import { KEEP_OPTIONS, type RetentionPolicy } from '../store/retention.js';
import { formatBytes } from '../util/sizes.js';
import { runStatus } from './progress.js';
import { EXIT_FAILURE, ExitStatus, Interrupted } from './run.js';
import { JSON_FORMATS, printJson, printJsonLine } from './json.js';

const NEXT_RUNS = 5;

/** Job files need zod, yaml and croner, about 190 ms to load: only the commands that read them pay for it. */
const loadJob = async (file: string) => (await import('../jobs/jobFile.js')).loadJob(file);
const schedule = () => import('../jobs/schedule.js');

/** `vhdvault job …`: each subcommand comes from its own function below. */
export function jobCommand(): Command {
  const job = new Command('job').description('scheduled backup jobs, one YAML file each (docs/jobs.md)');
  job.addCommand(runCommand());
  job.addCommand(checkCommand());
  job.addCommand(historyCommand());
  return job;
}

function runCommand(): Command {
  return new Command('run')
    .description('run a job once, now: every disk, then retention, verify, replication and the health check (exit 1 if anything failed)')
    .argument('<job.yaml>')
    .option('--full', "take a full backup of every disk and VM, whatever the job's fullInterval says")
    .option('--json', 'print the run report as one JSON object')
    .action(async (file: string, opts: { json?: boolean; full?: boolean }) => {
      const job = await loadJob(file);
      // SIGINT/SIGTERM stop the run: backups in progress abort cleanly, the report says so.
      const stop = new AbortController();
      let signal: NodeJS.Signals | null = null;
      const onSignal = (s: NodeJS.Signals) => {
        signal = s;
        stop.abort();
      };
      process.once('SIGINT', onSignal);
      process.once('SIGTERM', onSignal);
      const [{ runJob }, { describeRun }] = await Promise.all([import('../jobs/runJob.js'), import('../jobs/runReport.js')]);
      // On a terminal: what happens, and each disk's progress on a status line below.
      const status = opts.json || !process.stderr.isTTY ? null : runStatus();
      const log = status ? (line: string) => status.log(`${new Date().toISOString()} ${line}`) : undefined;
      let report;
      try {
        report = await runJob(job, { signal: stop.signal, log, full: opts.full, ...(status ? { progress: status.progress } : {}) });
      } finally {
        status?.stop();
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
      if (opts.json) printJson(JSON_FORMATS.jobRun, report);
      else for (const line of describeRun(report)) console.log(line);
      if (signal) throw new Interrupted(signal);
      if (!report.ok) throw new ExitStatus(EXIT_FAILURE);
    });
}

function historyCommand(): Command {
  return new Command('history')
    .description('past runs of the jobs that back up into <repo>, from the reports it keeps, and how each disk trends')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .option('--job <name>', 'only this job')
    .option('--json', 'print {runs, trends} as one JSON object')
    .action(async (root: string, opts: { job?: string; json?: boolean }) => {
      const repo = await Repository.open(root);
      if (opts.job !== undefined) checkDiskName(opts.job);
      const [{ describeHistory, diskTrends }, { loadRunReports }] = await Promise.all([import('../jobs/history.js'), import('../jobs/runReport.js')]);
      const runs = await loadRunReports(repo, opts.job, (problem) => console.error(`vhdvault: warning: ${problem}`));
      if (opts.json) printJson(JSON_FORMATS.jobHistory, { runs, trends: diskTrends(runs) });
      else if (runs.length === 0) console.log(`no job runs recorded in ${repo.root}${opts.job ? ` for job ${opts.job}` : ''}`);
      else for (const line of describeHistory(runs)) console.log(line);
    });
}

function checkCommand(): Command {
  return new Command('check')
    .description(`validate a job file, check (running nothing) that its repositories, sources, sockets and folders are there, and print its next ${NEXT_RUNS} run times (a bad file exits 2, anything missing 1)`)
    .argument('<job.yaml>')
    .option('--json', 'print one JSON object: the parsed job, scheduleZone, nextRuns and problems')
    .action(async (file: string, opts: { json?: boolean }) => {
      const job = await loadJob(file);
      const { isoInZone, nextRuns, scheduleZone } = await schedule();
      const zone = scheduleZone(job);
      const runs = nextRuns(job, NEXT_RUNS);
      const { problems, unchecked } = await (await import('../jobs/jobCheck.js')).checkJobPlaces(job);
      if (opts.json) printJsonLine(JSON_FORMATS.jobCheck, { ...job, scheduleZone: zone, nextRuns: runs.map((run) => isoInZone(run, zone)), problems });
      else {
        printCheck(job, zone, runs, await schedule());
        for (const line of unchecked) console.log(`not checked: ${line}`);
        for (const problem of problems) console.error(`vhdvault: ${job.file}: ${problem}`);
      }
      if (problems.length > 0) throw new ExitStatus(EXIT_FAILURE);
    });
}

function printCheck(job: Job, zone: string, runs: Date[], { humanInZone, isoInZone, localZone }: Awaited<ReturnType<typeof schedule>>): void {
  const here = localZone();
  console.log(`job ${job.name}: ${job.file}`);
  console.log(`repository: ${job.repository}`);
  console.log(`schedule: ${job.schedule} (${job.timezone === null ? `local time, ${zone}` : zone})`);
  const units = job.disks.length + job.vms.length;
  console.log(`disks: ${job.disks.length}${job.vms.length > 0 ? `, VMs: ${job.vms.length}` : ''}, ${Math.min(job.concurrency, units)} at a time`);
  const width = Math.max(...job.disks.map((disk) => disk.name.length), ...job.vms.map((vm) => vm.name.length));
  for (const disk of job.disks) console.log(`  ${disk.name.padEnd(width)}  ${disk.kind.padEnd(4)}  ${describeSource(disk)}`);
  for (const vm of job.vms) console.log(`  ${vm.name.padEnd(width)}  VM    ${vm.kind === 'libvirt' ? `libvirt domain ${vm.domain} on ${vm.connect}` : `QEMU ${vm.qmp}${vm.qga ? `, agent ${vm.qga}` : ''}`}`);
  console.log(`full backup: ${job.fullInterval === null ? 'the first only' : job.fullInterval === 1 ? 'every backup' : `every ${job.fullInterval} backups of a disk (at most ${job.fullInterval - 1} deltas in a row)`}`);
  console.log(`retention: ${describeRetention(job.retention)}`);
  console.log(`verify: ${job.verify}`);
  console.log(`health check: ${job.healthCheck === null ? 'off' : `restore into ${job.healthCheck.scratch ?? 'a temporary folder'}${job.healthCheck.boot ? "; boot each VM's newest backup" : ''}`}`);
  if (job.maxRead !== null || job.maxWrite !== null) console.log(`bandwidth: read ${describeRate(job.maxRead)}, write ${describeRate(job.maxWrite)}`);
  if (job.idlePriority) console.log('CPU: idle priority (backups run on spare CPU time only: --idle-priority)');
  if (job.replicate) console.log(`replicate: ${job.replicate.repository}, retention ${describeRetention(job.replicate.retention)}`);
  console.log(`next runs (${zone}; local time ${here}):`);
  for (const run of runs) console.log(`  ${isoInZone(run, zone)}  ${humanInZone(run, here)}`);
  if (runs.length === 0) console.log('  none');
}

function describeSource(disk: JobDisk): string {
  switch (disk.kind) {
    case 'file':
      return disk.fromRaw ? `${disk.path} (raw)` : disk.path;
    case 'nbd':
      return disk.bitmap === null ? disk.uri : `${disk.uri} (bitmap ${disk.bitmap})`;
    case 'qemu': {
      const extras = [`node ${disk.node}`];
      if (disk.device !== undefined) extras.push(`device ${disk.device}`);
      extras.push(disk.fleecing === undefined ? 'direct mode' : `fleecing ${disk.fleecing}`);
      return `${disk.qmp} (${extras.join(', ')})`;
    }
  }
}

function describeRetention(policy: RetentionPolicy | null): string {
  if (policy === null) return 'none (nothing is pruned)';
  return KEEP_OPTIONS.filter((option) => policy[option] !== undefined)
    .map((option) => `keep${option[0]!.toUpperCase()}${option.slice(1)} ${policy[option]}`)
    .join(', ');
}

function describeRate(rate: number | null): string {
  if (rate === null) return 'no limit';
  return `${formatBytes(rate)}/s`;
}
