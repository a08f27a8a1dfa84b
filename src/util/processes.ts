import { existsSync, readFileSync, readlinkSync } from 'node:fs';

/** This boot of the host (Linux boot_id), or undefined where there is none. */
export function bootId(): string | undefined {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** Field 22 of /proc/<pid>/stat (after the parenthesised command name, which may hold spaces): the start time in clock ticks. */
export function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** Is a process with this pid running (on this host)? A zombie (killed, not yet reaped) is not. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true; // no /proc: trust kill(0)
  }
}

/**
 * This process's PID namespace (`pid:[<inode>]`), or undefined where there is
 * none: containers sharing a host name (Kubernetes hostNetwork pods, `docker
 * --network host`) each have their own, so a pid means something only inside it.
 */
export function pidNamespace(): string | undefined {
  try {
    return readlinkSync('/proc/self/ns/pid');
  } catch {
    return undefined;
  }
}

const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));

/**
 * A command line that makes the program die with us (`setpriv --pdeathsig
 * SIGKILL`, util-linux), where setpriv exists: a server or VM we start is
 * never left running by a vhdvault killed with -9.
 */
export function withDeathSignal(argv: string[]): string[] {
  return SETPRIV ? [SETPRIV, '--pdeathsig', 'SIGKILL', '--', ...argv] : argv;
}
