/**
 * libvirt's command-line client, run once per request. vhdvault drives
 * libvirt through `virsh` rather than a Node binding: no libvirt binding for
 * Node is maintained (the old ones are years behind libvirt and need a native
 * build), while virsh is libvirt's own client, installed with it
 * (libvirt-clients), speaks every libvirt version's protocol and reports
 * errors in libvirt's own words. Each call is bounded: a timeout, and a cap
 * on what it may print.
 */
import { execFile } from 'node:child_process';
import { VaultError } from '../util/errors.js';

/** Long enough for libvirt's own wait on a domain's job lock (30 s), so its message arrives rather than ours. */
export const DEFAULT_VIRSH_TIMEOUT_MS = 60_000;
/** A domain's XML is a few KiB; lists are lines of names. */
const MAX_OUTPUT = 4 * 1024 * 1024;

export interface VirshOptions {
  timeoutMs?: number;
  /** What the error names: the domain, as a rule. */
  subject?: string;
}

/** A failed virsh: its message as libvirt wrote it, kept apart so callers can tell "no such domain" or "no job" from the rest. */
export class VirshError extends VaultError {
  constructor(
    subject: string,
    readonly command: string,
    /** libvirt's message, its "error: " prefixes dropped, on one line. */
    readonly said: string,
  ) {
    super(subject, `virsh ${command}: ${said}`);
    this.name = 'VirshError';
  }
}

/** `virsh -c <connect> <args…>`: what it printed on stdout. */
export function virsh(connect: string, args: string[], options: VirshOptions = {}): Promise<string> {
  const subject = options.subject ?? connect;
  const command = args[0] ?? '';
  return new Promise((resolve, reject) => {
    const timeoutMs = options.timeoutMs ?? DEFAULT_VIRSH_TIMEOUT_MS;
    execFile('virsh', ['-q', '-c', connect, ...args], { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: MAX_OUTPUT, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: number | string };
      if (e.code === 'ENOENT') return reject(new VaultError('virsh', 'not found: install libvirt-clients (libvirt\'s command-line client) to back up libvirt domains'));
      if (e.code === 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER') return reject(new VirshError(subject, command, `printed more than ${MAX_OUTPUT} bytes`));
      if (e.killed) return reject(new VirshError(subject, command, `no answer from libvirt on ${connect} within ${timeoutMs / 1000} s`));
      reject(new VirshError(subject, command, libvirtMessage(stderr) || `exited ${String(e.code)} without a message`));
    });
  });
}

/** virsh's "error: …" lines, on one line. */
function libvirtMessage(stderr: string): string {
  return stderr
    .split('\n')
    .map((l) => l.trim().replace(/^error:\s*/, ''))
    .filter(Boolean)
    .join('; ');
}
