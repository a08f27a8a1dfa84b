import { stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import type { Job } from '../jobs/jobFile.js';
import type { Repository } from '../store/repository.js';
import { UsageError } from '../util/errors.js';
import type { DashboardSources } from '../web/DashboardServer.js';

export interface HttpOptions {
  http?: string | true;
  tokenFile?: string;
}

export const HTTP_HELP = 'serve the dashboard, /api and /metrics on <host:port> (default 127.0.0.1:8080; any other than loopback needs --token-file)';
export const TOKEN_HELP = 'a file whose first line is the bearer token every request must carry';

/**
 * Starts the dashboard's server for `daemon --http` and `ui`: a usage error
 * (exit 2) for an address that is not loopback without a token, before
 * anything listens. Resolves to a function that stops it.
 */
export async function serveDashboard(opts: HttpOptions, sources: Omit<DashboardSources, 'open'>, log: (line: string) => void): Promise<{ url: string; stop: () => Promise<void> }> {
  const { DEFAULT_LISTEN, isLoopback, parseListen, readToken } = await import('../web/access.js');
  const listen = parseListen(typeof opts.http === 'string' ? opts.http : DEFAULT_LISTEN);
  if (!isLoopback(listen.host) && opts.tokenFile === undefined) {
    throw new UsageError(`--http ${listen.host}:${listen.port}: listening beyond this host (not a loopback address) needs --token-file`);
  }
  const token = opts.tokenFile === undefined ? null : await readToken(opts.tokenFile);
  const { DashboardServer } = await import('../web/DashboardServer.js');
  const server = new DashboardServer({ ...sources, open: repositoryOpener() }, { listen, token, log });
  const url = await server.start().catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`--http ${listen.host}:${listen.port}: cannot listen (${err.code ?? err.message})`);
  });
  return { url, stop: () => server.stop() };
}

/** Opens each repository once for the server's life (an encrypted one's key is derived once); a failure is tried again next time. */
function repositoryOpener(): (path: string) => Promise<Repository> {
  const open = new Map<string, Promise<Repository>>();
  return (path) => {
    let p = open.get(path);
    if (!p) {
      p = import('../store/repository.js').then(({ Repository }) => Repository.open(path));
      open.set(path, p);
      p.catch(() => open.delete(path));
    }
    return p;
  };
}

/** `vhdvault ui <repo|job files…>`: the dashboard alone, read-only, scheduling nothing. */
export function uiCommand(): Command {
  return new Command('ui')
    .description('serve the dashboard of repositories and job files (read-only: no schedule, no "run now") until SIGINT/SIGTERM')
    .argument('<repo-or-job...>', 'repositories (folders or s3://bucket/prefix), job files (*.yaml) or folders of job files')
    .option('--http <host:port>', HTTP_HELP)
    .option('--token-file <file>', TOKEN_HELP)
    .action(async (args: string[], opts: HttpOptions) => {
      const { jobs, repositories } = await sortArguments(args);
      const { NO_LIVE_STATE } = await import('../web/dashboard.js');
      const { url, stop } = await serveDashboard(opts, { jobs: () => jobs, repositories, live: NO_LIVE_STATE }, (line) => console.error(`vhdvault: ${line}`));
      const repos = new Set([...repositories, ...jobs.map((j) => j.repository)]).size;
      console.log(`vhdvault ui: ${url} (${jobs.length} job${jobs.length === 1 ? '' : 's'}, ${repos} repositor${repos === 1 ? 'y' : 'ies'})`);
      await new Promise<void>((done) => {
        const onStop = () => void stop().then(done);
        process.once('SIGTERM', onStop);
        process.once('SIGINT', onStop);
      });
    });
}

/** Job files by their name (.yaml, .yml), folders by what they hold (a repository's vhdvault.json, else job files). */
async function sortArguments(args: string[]): Promise<{ jobs: Job[]; repositories: string[] }> {
  const { loadJob } = await import('../jobs/jobFile.js');
  const jobs: Job[] = [];
  const repositories: string[] = [];
  const isJobFile = (p: string) => /\.ya?ml$/i.test(p);
  for (const arg of args) {
    if (arg.startsWith('s3://')) repositories.push(arg);
    else if (isJobFile(arg)) jobs.push(await loadJob(arg));
    else if (await exists(join(arg, 'vhdvault.json'))) repositories.push(resolve(arg));
    else {
      const { readdir } = await import('node:fs/promises');
      const names = await readdir(arg).catch(() => null);
      const files = (names ?? []).filter(isJobFile).sort();
      if (files.length === 0) throw new UsageError(`${arg}: neither a repository (no vhdvault.json) nor a job file or a folder of them`);
      for (const f of files) jobs.push(await loadJob(join(arg, f)));
    }
  }
  return { jobs, repositories };
}

const exists = (p: string) => stat(p).then(() => true, () => false);
