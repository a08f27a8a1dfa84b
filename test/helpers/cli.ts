import { expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../dist/src/cli/main.js', import.meta.url));

/**
 * The environment the tests run the CLI in: this one (plus `extra`), less NODE_EXTRA_CA_CERTS.
 * Node loads and parses that certificate bundle at every start-up (about 70 ms
 * of CPU for a system bundle, a quarter of a CLI run), and the CLI never opens
 * a TLS connection, so the tests' hundreds of runs go without it.
 */
export function cliEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  delete env.NODE_EXTRA_CA_CERTS;
  return env;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the built `vhdvault` binary. */
export function vhdvault(...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: cliEnv() });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Run the built `vhdvault` binary without blocking, so that independent runs
 * can overlap (each costs a Node start-up). Same result as `vhdvault`: stdin
 * an empty pipe, stdout and stderr captured, -1 for a run killed by a signal.
 */
export function vhdvaultAsync(...args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: cliEnv() });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.stdin.on('error', () => undefined).end();
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Exit 1, nothing on stdout, one line naming `name` and matching `problem`, no stack; returns that line. */
export function expectRefused(r: CliResult, name: string, problem: RegExp): string {
  const context = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  expect(r.code, context).toBe(1);
  expect(r.stdout, context).toBe('');
  expect(r.stderr, context).not.toContain('    at ');
  expect(r.stderr.trimEnd().split('\n'), context).toHaveLength(1);
  expect(r.stderr, context).toContain(name);
  expect(r.stderr, context).toMatch(problem);
  return r.stderr;
}
