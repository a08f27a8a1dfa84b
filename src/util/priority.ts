/**
 * --idle-priority: the backup's threads under Linux's SCHED_IDLE policy, so
 * that they run only on CPU time nothing else wants. On a host whose cores
 * the guests keep busy, a backup at normal priority wakes up in the middle of
 * a guest's I/O and takes a time slice from it (docs/performance.md: a
 * guest's p99 write latency doubled at 20 MB/s of backup on 2 cores); an
 * idle-policy thread never preempts a normal one.
 */
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { VaultError } from './errors.js';

/** The policy number /proc reports for SCHED_IDLE (sched.h). */
const SCHED_IDLE = 5;

/**
 * Put every thread of this process under SCHED_IDLE; threads started later
 * (the worker pool, libuv's) inherit it. Node has no sched_setscheduler:
 * util-linux's chrt sets it from outside, on each thread (--all-tasks). The
 * policy is then read back from /proc, so a silent failure cannot pass.
 */
export async function enterIdlePriority(): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    execFile('chrt', ['--idle', '--all-tasks', '--pid', '0', String(process.pid)], (err, _stdout, stderr) => {
      if (!err) resolve();
      else if ((err as NodeJS.ErrnoException).code === 'ENOENT') reject(new VaultError('chrt', 'not found: --idle-priority needs chrt (Debian package util-linux)'));
      else reject(new VaultError('chrt', `could not set the idle CPU policy: ${stderr.trim() || err.message}`));
    });
  });
  const policies = await threadPolicies(process.pid);
  if (policies.some((p) => p !== SCHED_IDLE)) throw new VaultError('chrt', 'the idle CPU policy did not take on every thread');
}

/** The scheduling policy of each thread of `pid` (field 41 of /proc/<pid>/task/<tid>/stat). */
export async function threadPolicies(pid: number): Promise<number[]> {
  const tids = await readdir(`/proc/${pid}/task`);
  const out: number[] = [];
  for (const tid of tids) {
    const stat = await readFile(`/proc/${pid}/task/${tid}/stat`, 'utf8').catch(() => null); // a thread that ended meanwhile
    if (stat === null) continue;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.push(Number(fields[41 - 3]));
  }
  return out;
}

export const isIdlePolicy = (policy: number): boolean => policy === SCHED_IDLE;
