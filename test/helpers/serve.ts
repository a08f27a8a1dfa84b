/**
 * `vhdvault serve` as a user runs it: started in the background, ready once
 * it prints its JSON ready line, stopped with a signal.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll } from 'vitest';
import { CLI, cliEnv } from './cli.js';

export interface Serving {
  /** The default export's URI, as printed. */
  uri: string;
  ready: { uri: string; exportName: string; backup: string; writable: boolean; overlay: string | null; exports: string[] };
  child: ChildProcess;
  /** Everything printed on stderr so far. */
  stderr: () => string;
  /** SIGTERM (or `signal`), then the exit code. */
  stop: (signal?: NodeJS.Signals) => Promise<number>;
}

const running = new Set<ChildProcess>();
afterAll(() => {
  for (const child of running) child.kill('SIGKILL');
});

/** Start `vhdvault serve <args> --json`; rejects with its stderr if it exits before it is ready. */
export function startServe(...args: string[]): Promise<Serving> {
  const child = spawn(process.execPath, [CLI, 'serve', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
  running.add(child);
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((resolve) =>
    child.on('exit', (code, signal) => {
      running.delete(child);
      resolve(code ?? (signal ? -1 : 0));
    }),
  );
  return new Promise((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
      const line = stdout.split('\n')[0];
      if (!stdout.includes('\n') || !line) return;
      const ready = JSON.parse(line) as Serving['ready'];
      resolve({
        uri: ready.uri,
        ready,
        child,
        stderr: () => stderr,
        stop: async (signal: NodeJS.Signals = 'SIGTERM') => {
          child.kill(signal);
          return exited;
        },
      });
    });
    void exited.then((code) => reject(new Error(`serve exited (${code}) before it was ready: ${stderr}`)));
  });
}

/** The same export on the same server, by name. */
export function exportUri(serving: Serving, name: string): string {
  const base = serving.uri;
  if (base.startsWith('nbd+unix:///')) return base.replace(/^nbd\+unix:\/\/\/[^?]*/, `nbd+unix:///${name}`);
  return base.replace(/\/[^/]*$/, `/${name}`);
}
