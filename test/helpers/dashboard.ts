/** The dashboard's servers as child processes: `vhdvault ui`, and the URL a daemon with --http says it serves. */
import { type ChildProcess, spawn } from 'node:child_process';
import { CLI, cliEnv } from './cli.js';
import type { Daemon } from './daemon.js';

const uis = new Set<ChildProcess>();

/** For afterAll: no `ui` outlives its test file. */
export function killUis(): void {
  for (const c of uis) c.kill('SIGKILL');
}

/** `vhdvault ui <args…>`; resolves to its base URL (no trailing slash) once it listens. */
export function startUi(...args: string[]): Promise<string> {
  const child = spawn(process.execPath, [CLI, 'ui', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
  uis.add(child);
  child.once('exit', () => uis.delete(child));
  let out = '';
  child.stdout!.setEncoding('utf8');
  return new Promise((resolve, reject) => {
    child.stdout!.on('data', (d: string) => {
      out += d;
      const m = /vhdvault ui: (http:\/\/\S+)\//.exec(out);
      if (m) resolve(m[1]!);
    });
    child.once('exit', (code) => reject(new Error(`ui exited with ${code}: ${out}`)));
  });
}

/** The base URL of a daemon's dashboard, once its `listening` event came. */
export async function daemonDashboard(d: Daemon): Promise<string> {
  const at = await d.waitFor((e) => e.event === 'listening');
  return /dashboard at (http:\/\/\S+)\//.exec(d.events[at]!.message)![1]!;
}
