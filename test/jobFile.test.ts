import { spawnSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { nextRunAfter, nextRuns, previousRunBefore } from '../src/jobs/schedule.js';
import { parseJob } from '../src/jobs/jobFile.js';
import { backupArgs, vmBackupArgs } from '../src/jobs/diskBackup.js';
import { CLI, cliEnv, type CliResult, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';

/** The issue's example, byte for byte: it must be accepted as written. */
const ISSUE_EXAMPLE = `name: nightly
schedule: "0 3 * * *"          # optional seconds field in front; timezone: key optional
repository: /backups/main
concurrency: 2
fullInterval: 4
disks:
  - name: vm1-d1
    source: /var/lib/images/vm1-d1.raw          # or nbd://…, or qmp: /run/vm1.qmp + node: …
  - name: vm1-d2
    source: /var/lib/images/vm1-d2.raw
retention:
  keepLast: 3                   # keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly
verify: new                     # none | new | all
replicate:
  repository: /mnt/offsite/backups
  retention:
    keepLast: 5
`;

/** A small valid job to vary: name, schedule, repository and one file disk. */
const MINIMAL = `name: small
schedule: "0 3 * * *"
repository: repo
disks:
  - name: d1
    source: d1.raw
`;

let dir: string;
beforeAll(async () => {
  dir = await tempDir('vhdvault-jobs-');
});

async function jobFile(name: string, text: string | Buffer): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, text);
  return path;
}

/** `job check` with the process's time zone set (the "local" zone of a job without timezone:). */
function checkIn(tz: string, ...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, 'job', 'check', ...args], { encoding: 'utf8', env: cliEnv({ TZ: tz }) });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** The JSON of `job check --json`: the places these jobs name mostly do not exist, so it exits 1 exactly when it lists problems. */
function checkJson(r: CliResult): Record<string, any> {
  expect(r.stderr).toBe('');
  const job = JSON.parse(r.stdout);
  expect(r.code).toBe(job.problems.length > 0 ? 1 : 0);
  return job;
}

describe('job check: good files', () => {
  it('accepts the issue example as written and prints the summary and the next 5 runs', async () => {
    const file = await jobFile('nightly.yaml', ISSUE_EXAMPLE);
    const r = checkIn('Europe/Berlin', file);
    // The file is good; the places it names are not on this machine: each said, exit 1.
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trimEnd().split('\n')).toEqual([
      `vhdvault: ${file}: repository: /backups/main: is not a vhdvault repository (no vhdvault.json); create one with \`vhdvault init\``,
      `vhdvault: ${file}: replicate.repository: /mnt/offsite/backups: is not a vhdvault repository (no vhdvault.json); create one with \`vhdvault init\``,
      `vhdvault: ${file}: disk vm1-d1: source: /var/lib/images/vm1-d1.raw: no such file or directory`,
      `vhdvault: ${file}: disk vm1-d2: source: /var/lib/images/vm1-d2.raw: no such file or directory`,
    ]);
    expect(r.stdout).toContain('job nightly');
    expect(r.stdout).toContain('repository: /backups/main');
    expect(r.stdout).toMatch(/vm1-d1\s+file\s+\/var\/lib\/images\/vm1-d1\.raw/);
    expect(r.stdout).toContain('0 3 * * * (local time, Europe/Berlin)');
    const runs = r.stdout.split('\n').filter((line) => /^\s+\d{4}-\d\d-\d\dT/.test(line));
    expect(runs).toHaveLength(5);
    for (const line of runs) expect(line).toMatch(/T03:00:00\+0[12]:00\s+\w{3}, \d+ \w{3} \d{4}, 03:00:00 CES?T$/);

    const job = checkJson(checkIn('Europe/Berlin', file, '--json'));
    expect(job).toMatchObject({
      name: 'nightly',
      schedule: '0 3 * * *',
      timezone: null,
      scheduleZone: 'Europe/Berlin',
      repository: '/backups/main',
      concurrency: 2,
      fullInterval: 4,
      verify: 'new',
      healthCheck: null,
      maxRead: null,
      retention: { last: 3 },
      replicate: { repository: '/mnt/offsite/backups', retention: { last: 5 } },
      disks: [
        { kind: 'file', name: 'vm1-d1', path: '/var/lib/images/vm1-d1.raw' },
        { kind: 'file', name: 'vm1-d2', path: '/var/lib/images/vm1-d2.raw' },
      ],
    });
    expect(job.nextRuns).toHaveLength(5);
    const times = job.nextRuns.map((iso: string) => Date.parse(iso));
    expect(times.every((t: number, i: number) => i === 0 || t > times[i - 1]!)).toBe(true);
    expect(times[0]).toBeGreaterThan(Date.now());
  });

  it('takes a seconds field in front, defaults, and resolves paths against the job file', async () => {
    const file = await jobFile('seconds.yaml', MINIMAL.replace('"0 3 * * *"', '"30 15 3 * * *"'));
    const job = checkJson(checkIn('UTC', file, '--json'));
    expect(job.nextRuns).toHaveLength(5);
    for (const iso of job.nextRuns) expect(iso).toMatch(/T03:15:30\+00:00$/);
    expect(job).toMatchObject({ concurrency: 1, fullInterval: null, verify: 'none', healthCheck: null, retention: null, replicate: null, timezone: null });
    // Relative to the job file's folder, not to where the command runs.
    expect(job.repository).toBe(join(dir, 'repo'));
    expect(job.disks[0]).toEqual({ kind: 'file', name: 'd1', path: join(dir, 'd1.raw'), fromRaw: false });
  });

  it('reads times in the timezone: key, whatever the local zone', async () => {
    const file = await jobFile('tz.yaml', `${MINIMAL}timezone: Asia/Kolkata\n`);
    const job = checkJson(checkIn('America/New_York', file, '--json'));
    expect(job.timezone).toBe('Asia/Kolkata');
    for (const iso of job.nextRuns) expect(iso).toMatch(/T03:00:00\+05:30$/);
    const text = checkIn('America/New_York', file);
    expect(text.stdout).toContain('0 3 * * * (Asia/Kolkata)');
    // The same instants in local (New York) time: 03:00 IST is 16:30 or 17:30 there, the day before.
    expect(text.stdout).toMatch(/T03:00:00\+05:30\s+\w{3}, \d+ \w{3} \d{4}, 1[67]:30:00 (E[SD]T|GMT-[45])/);
  });

  it('takes every kind of source, and the optional keys', async () => {
    const file = await jobFile(
      'sources.yaml',
      `name: all-kinds
schedule: "*/15 * * * *"
timezone: Europe/Berlin
repository: /backups/main
concurrency: 3
maxRead: 20M
maxWrite: 1048576
verify: all
healthCheck:
  scratch: scratch
retention: { keepLast: 2, keepDaily: 7, keepWeekly: 4, keepMonthly: 6, keepYearly: 1, keepHourly: 12 }
replicate:
  repository: ../offsite
disks:
  - name: file-disk
    source: images/a.vhd
    from: raw
  - name: nbd-tcp
    source: nbd://10.0.0.5:10810/disk0
    bitmap: b1
  - name: nbd-unix
    source: "nbd+unix:///disk1?socket=/run/qsd.sock&bitmap=b2"
  - name: qemu-fleecing
    qmp: /run/vm1.qmp
    node: disk0
    device: virtio0
    fleecing: /fast/fleece
    fleecingMax: 4G
    cbwTimeout: 30
    qemuNbd: "nbd+unix:///?socket=/run/qsd/nbd.sock"
  - name: qemu-direct
    qmp: run/qsd.qmp
    node: g0
`,
    );
    const job = checkJson(await vhdvaultAsync('job', 'check', file, '--json'));
    expect(job).toMatchObject({
      concurrency: 3,
      maxRead: 20 * 1048576,
      maxWrite: 1048576,
      idlePriority: false,
      verify: 'all',
      healthCheck: { scratch: join(dir, 'scratch') },
      retention: { last: 2, hourly: 12, daily: 7, weekly: 4, monthly: 6, yearly: 1 },
      replicate: { repository: join(dir, '../offsite'), retention: null },
    });
    expect(job.disks).toEqual([
      { kind: 'file', name: 'file-disk', path: join(dir, 'images/a.vhd'), fromRaw: true },
      {
        kind: 'nbd',
        name: 'nbd-tcp',
        uri: 'nbd://10.0.0.5:10810/disk0',
        bitmap: 'b1',
        address: { uri: 'nbd://10.0.0.5:10810/disk0', endpoint: { transport: 'tcp', host: '10.0.0.5', port: 10810 }, exportName: 'disk0', bitmap: null },
      },
      {
        kind: 'nbd',
        name: 'nbd-unix',
        uri: 'nbd+unix:///disk1?socket=/run/qsd.sock&bitmap=b2',
        bitmap: 'b2',
        address: { uri: 'nbd+unix:///disk1?socket=/run/qsd.sock&bitmap=b2', endpoint: { transport: 'unix', socket: '/run/qsd.sock' }, exportName: 'disk1', bitmap: 'b2' },
      },
      {
        kind: 'qemu',
        name: 'qemu-fleecing',
        qmp: '/run/vm1.qmp',
        node: 'disk0',
        device: 'virtio0',
        fleecing: '/fast/fleece',
        fleecingMax: 4 * 1024 ** 3,
        cbwTimeout: 30,
        qemuNbd: { transport: 'unix', socket: '/run/qsd/nbd.sock' },
      },
      { kind: 'qemu', name: 'qemu-direct', qmp: join(dir, 'run/qsd.qmp'), node: 'g0' },
    ]);
    for (const iso of job.nextRuns) expect(iso).toMatch(/:(00|15|30|45):00\+0[12]:00$/);

    const text = vhdvault('job', 'check', file);
    expect(text.code, text.stderr).toBe(1);
    expect(text.stdout).toContain('not checked: disk nbd-tcp: source: 10.0.0.5:10810 (a TCP server is reached only by a run)');
    expect(text.stderr).toContain(`disk qemu-direct: qmp: ${join(dir, 'run/qsd.qmp')}: no such file or directory`);
    expect(text.stdout).toMatch(/nbd-unix\s+nbd\s+nbd\+unix:\/\/\/disk1\?socket=\/run\/qsd\.sock&bitmap=b2 \(bitmap b2\)/);
    expect(text.stdout).toMatch(/qemu-direct\s+qemu\s+\S+run\/qsd\.qmp \(node g0, direct mode\)/);
  });

  it('healthCheck: true is a temporary scratch folder, false is off', async () => {
    const on = checkJson(await vhdvaultAsync('job', 'check', await jobFile('hc-on.yaml', `${MINIMAL}healthCheck: true\n`), '--json'));
    expect(on.healthCheck).toEqual({ scratch: null, boot: false });
    const off = checkJson(await vhdvaultAsync('job', 'check', await jobFile('hc-off.yaml', `${MINIMAL}healthCheck: false\n`), '--json'));
    expect(off.healthCheck).toBeNull();
  });

  it('vms: a libvirt domain (connect defaults to qemu:///system) or a QEMU VM; healthCheck: boot; a job of VMs only', async () => {
    const text = `name: vms\nschedule: "0 3 * * *"\nrepository: repo\nhealthCheck: boot\nvms:\n  - name: web\n    libvirt: web-prod\n  - name: db\n    qmp: run/db.qmp\n    qga: run/db-qga.sock\n    fleecing: /fast\n`;
    const file = await jobFile('vms.yaml', text);
    const job = checkJson(await vhdvaultAsync('job', 'check', file, '--json'));
    expect(job.disks).toEqual([]);
    expect(job.vms).toEqual([
      { kind: 'libvirt', name: 'web', domain: 'web-prod', connect: 'qemu:///system' },
      { kind: 'qemu', name: 'db', qmp: join(dir, 'run/db.qmp'), qga: join(dir, 'run/db-qga.sock'), fleecing: '/fast' },
    ]);
    expect(job.healthCheck).toEqual({ scratch: null, boot: true });
    const printed = vhdvault('job', 'check', file);
    expect(printed.stdout).toMatch(/web\s+VM\s+libvirt domain web-prod on qemu:\/\/\/system/);
    expect(printed.stdout).toMatch(/boot each VM's newest backup/);
    expect(printed.stdout).toContain('not checked: VM web: libvirt domain web-prod on qemu:///system (asked of libvirt only by a run)');
    expect(printed.stderr).toContain(`VM db: qga: ${join(dir, 'run/db-qga.sock')}: no such file or directory`);
  });
});

describe('idlePriority', () => {
  it('true: every backup and VM backup of the job runs with --idle-priority, and job check says so', async () => {
    const text = `${MINIMAL}idlePriority: true\nvms:\n  - name: web\n    qmp: /run/web.qmp\n    fleecing: /fast\n  - name: db\n    libvirt: db\n`;
    const job = parseJob(text, join(dir, 'idle.yaml'));
    expect(job.idlePriority).toBe(true);
    expect(backupArgs(job, job.disks[0]!, false)).toContain('--idle-priority');
    for (const vm of job.vms) expect(vmBackupArgs(job, vm, false)).toContain('--idle-priority');
    const file = join(dir, 'idle.yaml');
    await writeFile(file, text);
    expect((await vhdvaultAsync('job', 'check', file)).stdout).toContain('CPU: idle priority (backups run on spare CPU time only: --idle-priority)');
    const plain = parseJob(MINIMAL, join(dir, 'plain.yaml'));
    expect(backupArgs(plain, plain.disks[0]!, false)).not.toContain('--idle-priority');
  });
});

describe('job check: bad files exit 2 with one line naming the file and the key', () => {
  const replaceDisk = (disk: string) => MINIMAL.replace('  - name: d1\n    source: d1.raw\n', disk);
  // [file name, contents, key path (or position) the line must name, what it must say]
  const cases: Array<[string, string | (() => Buffer), string, RegExp]> = [
    ['unknown-key.yaml', ISSUE_EXAMPLE.replace('keepLast: 3', 'keeplast: 3'), 'retention.keeplast', /unknown key \(did you mean keepLast\?\)/],
    ['unknown-top.yaml', `${MINIMAL}compression: gzip\n`, 'compression', /unknown key \(known here: name, schedule/],
    ['misspelt.yaml', MINIMAL.replace('schedule:', 'shedule:'), 'shedule', /did you mean schedule\?/],
    ['wrong-type.yaml', `${MINIMAL}concurrency: two\n`, 'concurrency', /expected a whole number from 1 to 64 .*got "two"/],
    ['zero.yaml', `${MINIMAL}fullInterval: 0\n`, 'fullInterval', /expected a whole number of at least 1/],
    ['bad-verify.yaml', `${MINIMAL}verify: some\n`, 'verify', /expected none, new or all, got "some"/],
    ['bad-rate.yaml', `${MINIMAL}maxRead: fast\n`, 'maxRead', /expected a rate such as "20M"/],
    ['bad-cron.yaml', MINIMAL.replace('0 3 * * *', '0 25 * * *'), 'schedule', /not a valid cron schedule: .*hour/],
    ['cron-fields.yaml', MINIMAL.replace('0 3 * * *', '0 3 * *'), 'schedule', /expected a cron schedule of 5 fields .*got 4 fields/],
    ['cron-never.yaml', MINIMAL.replace('0 3 * * *', '0 3 31 2 *'), 'schedule', /never fires/],
    ['missing.yaml', MINIMAL.replace('schedule: "0 3 * * *"\n', ''), 'schedule', /missing: expected a cron schedule/],
    ['bad-tz.yaml', `${MINIMAL}timezone: Mars/Olympus\n`, 'timezone', /expected an IANA time zone .*got "Mars\/Olympus"/],
    ['dup-disks.yaml', replaceDisk('  - name: d1\n    source: a.raw\n  - name: d1\n    source: b.raw\n'), 'disks[1].name', /expected a name no other disk has, got "d1" again/],
    ['bad-disk-name.yaml', replaceDisk('  - name: ../etc\n    source: a.raw\n'), 'disks[0].name', /expected a disk name of 1-128 letters/],
    ['bad-job-name.yaml', MINIMAL.replace('name: small', 'name: "a/b"'), 'name', /expected a job name of 1-128 letters/],
    ['both.yaml', replaceDisk('  - name: d1\n    source: a.raw\n    qmp: /run/vm1.qmp\n    node: disk0\n'), 'disks[0].qmp', /expected either source or qmp/],
    ['neither.yaml', replaceDisk('  - name: d0\n    source: a.raw\n  - name: d1\n'), 'disks[1].source', /expected a path, an nbd:\/\/ URI, or qmp \+ node$/],
    ['no-node.yaml', replaceDisk('  - name: d1\n    qmp: /run/vm1.qmp\n'), 'disks[0].node', /expected a QEMU node name/],
    ['qemu-key-on-file.yaml', replaceDisk('  - name: d1\n    source: a.raw\n    fleecing: /fast\n'), 'disks[0].fleecing', /only for a QEMU disk/],
    ['bitmap-on-file.yaml', replaceDisk('  - name: d1\n    source: a.raw\n    bitmap: b1\n'), 'disks[0].bitmap', /a bitmap needs an NBD source/],
    ['bad-uri.yaml', replaceDisk('  - name: d1\n    source: "nbds://host/x"\n'), 'disks[0].source', /TLS \(nbds:\/\/\) is not supported/],
    ['relative-socket.yaml', replaceDisk('  - name: d1\n    source: "nbd+unix:///x?socket=run/s.sock"\n'), 'disks[0].source', /expected an absolute socket path/],
    ['empty-disks.yaml', MINIMAL.replace(/disks:\n[\s\S]*$/, 'disks: []\n'), 'disks', /expected at least one disk/],
    ['empty-retention.yaml', `${MINIMAL}retention: {}\n`, 'retention', /expected at least one of keepLast, keepHourly/],
    ['same-replica.yaml', `${MINIMAL}replicate:\n  repository: ./repo/\n`, 'replicate.repository', /expected a repository other than repository/],
    ['syntax.yaml', 'name: a\ndisks: [1, 2\nschedule: x\n', 'line 3, column 1', /not valid YAML/],
    ['dup-key.yaml', `${MINIMAL}name: again\n`, 'line 7, column 1', /not valid YAML: Map keys must be unique/],
    ['list.yaml', '- name: a\n- name: b\n', 'list.yaml: expected a mapping', /got a list$/],
    ['empty.yaml', '', 'empty.yaml: the file is empty', /expected a mapping of job keys/],
    ['huge.yaml', () => Buffer.alloc(1024 * 1024 + 1, '#'), 'huge.yaml: larger than 1 MiB', /not a job file$/],
    ['newline.yaml', MINIMAL.replace('name: small', 'name: "a\\nb"'), 'name', /got "a\\nb"$/],
    ['vm-both.yaml', `${MINIMAL}vms:\n  - name: web\n    libvirt: web\n    qmp: /run/web.qmp\n`, 'vms[0].libvirt', /expected either libvirt \(a domain\) or qmp/],
    ['vm-neither.yaml', `${MINIMAL}vms:\n  - name: web\n`, 'vms[0].libvirt', /expected either libvirt/],
    ['vm-dot.yaml', `${MINIMAL}vms:\n  - name: web.1\n    libvirt: web\n`, 'vms[0].name', /no '\.'/],
    ['vm-qga-libvirt.yaml', `${MINIMAL}vms:\n  - name: web\n    libvirt: web\n    qga: /run/qga.sock\n`, 'vms[0].qga', /only for a QEMU VM/],
    ['vm-clash.yaml', `${MINIMAL.replace('name: d1', 'name: web.vda')}vms:\n  - name: web\n    libvirt: web\n`, 'vms[0].name', /disk "web\.vda" would be taken for one of its disks/],
    ['boot-no-vms.yaml', `${MINIMAL}healthCheck: boot\n`, 'healthCheck.boot', /the job has no vms:/],
    ['nothing.yaml', MINIMAL.replace(/disks:\n[\s\S]*$/, ''), 'disks', /expected at least one disk \(disks:\) or VM \(vms:\)/],
    ['idle-direct.yaml', `${replaceDisk('  - name: d1\n    qmp: /run/vm1.qmp\n    node: disk0\n')}idlePriority: true\n`, 'disks[0].fleecing', /idlePriority needs a fleecing folder .*direct mode the guest waits/],
    ['idle-vm-direct.yaml', `${MINIMAL}idlePriority: true\nvms:\n  - name: web\n    qmp: /run/web.qmp\n`, 'vms[0].fleecing', /idlePriority needs a fleecing folder/],
    ['idle-bad.yaml', `${MINIMAL}idlePriority: yes please\n`, 'idlePriority', /expected true or false/],
  ];

  // Each case is a Node start-up: overlapping them saves most of the time.
  it.concurrent.each(cases)('%s', async (name, contents, where, problem) => {
    const file = await jobFile(name, typeof contents === 'function' ? contents() : contents);
    const r = await vhdvaultAsync('job', 'check', file);
    const context = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
    expect(r.code, context).toBe(2);
    expect(r.stdout, context).toBe('');
    expect(r.stderr, context).not.toContain('    at ');
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines, context).toHaveLength(1);
    // `vhdvault: <file>: <key path>: <what was expected>`
    expect(lines[0]!.startsWith(`vhdvault: ${file}: `), context).toBe(true);
    expect(lines[0], context).toContain(where.includes(': ') ? where : `${file}: ${where}: `);
    expect(lines[0], context).toMatch(problem);
  });

  it('names the file as given, and refuses a missing file or a folder', async () => {
    const r = spawnSync(process.execPath, [CLI, 'job', 'check', 'bad-tz.yaml'], { cwd: dir, encoding: 'utf8', env: cliEnv() });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^vhdvault: bad-tz\.yaml: timezone: expected an IANA time zone/);
    const missing = await vhdvaultAsync('job', 'check', join(dir, 'nope.yaml'));
    expect(missing.code).toBe(2);
    expect(missing.stderr).toBe(`vhdvault: ${join(dir, 'nope.yaml')}: cannot read: no such file or directory\n`);
    const folder = await vhdvaultAsync('job', 'check', dir);
    expect(folder.code).toBe(2);
    expect(folder.stderr).toBe(`vhdvault: ${dir}: is a directory, not a job file\n`);
  });
});

describe('schedule across daylight saving time (croner, fixedTimeRule no-wildcard; as measured)', () => {
  const berlin = (schedule: string) => ({ schedule, timezone: 'Europe/Berlin' });
  const iso = (dates: Date[]) => dates.map((d) => d.toISOString());

  it('a fixed time skipped by spring-forward runs once, at the first time after the gap', () => {
    // 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist.
    expect(iso(nextRuns(berlin('30 2 * * *'), 3, new Date('2026-03-27T12:00:00Z')))).toEqual([
      '2026-03-28T01:30:00.000Z', // 02:30 CET
      '2026-03-29T01:00:00.000Z', // 03:00 CEST
      '2026-03-30T00:30:00.000Z', // 02:30 CEST
    ]);
    // The same with a seconds field, and with several times in the gap: one run.
    expect(iso(nextRuns(berlin('0 30 2 * * *'), 1, new Date('2026-03-28T12:00:00Z')))).toEqual(['2026-03-29T01:00:00.000Z']);
    expect(iso(nextRuns(berlin('15,45 2 * * *'), 2, new Date('2026-03-28T12:00:00Z')))).toEqual(['2026-03-29T01:00:00.000Z', '2026-03-30T00:15:00.000Z']);
    // A list of hours is a fixed time too: its 02:30 is not skipped.
    expect(iso(nextRuns(berlin('30 2,14 * * *'), 2, new Date('2026-03-28T12:00:00Z')))).toEqual(['2026-03-28T13:30:00.000Z', '2026-03-29T01:00:00.000Z']);
  });

  it('a fixed time repeated by fall-back runs once, at its first occurrence', () => {
    // 2026-10-25: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice.
    expect(iso(nextRuns(berlin('30 2 * * *'), 3, new Date('2026-10-24T12:00:00Z')))).toEqual([
      '2026-10-25T00:30:00.000Z', // 02:30 CEST
      '2026-10-26T01:30:00.000Z', // 02:30 CET the next day: not 01:30Z on the 25th
      '2026-10-27T01:30:00.000Z',
    ]);
    expect(iso(nextRuns(berlin('30 2,14 * * *'), 2, new Date('2026-10-24T13:00:00Z')))).toEqual(['2026-10-25T00:30:00.000Z', '2026-10-25T13:30:00.000Z']);
  });

  it('an interval job skips the gap and runs through the repeated hour twice', () => {
    expect(iso(nextRuns(berlin('*/30 2 * * *'), 2, new Date('2026-03-28T12:00:00Z')))).toEqual(['2026-03-30T00:00:00.000Z', '2026-03-30T00:30:00.000Z']);
    expect(iso(nextRuns(berlin('*/30 2 * * *'), 4, new Date('2026-10-24T12:00:00Z')))).toEqual([
      '2026-10-25T00:00:00.000Z',
      '2026-10-25T00:30:00.000Z',
      '2026-10-25T01:00:00.000Z',
      '2026-10-25T01:30:00.000Z',
    ]);
  });

  it('next and previous runs are strictly after and before the instant given', () => {
    const s = berlin('30 2 * * *');
    expect(nextRunAfter(s, new Date('2026-10-25T00:30:00Z'))?.toISOString()).toBe('2026-10-26T01:30:00.000Z');
    expect(nextRunAfter(s, new Date('2026-10-25T00:29:59.999Z'))?.toISOString()).toBe('2026-10-25T00:30:00.000Z');
    expect(previousRunBefore(s, new Date('2026-03-30T00:30:00Z'))?.toISOString()).toBe('2026-03-29T01:00:00.000Z');
  });
});
