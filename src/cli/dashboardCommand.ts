import { stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import type { Job } from '../jobs/jobFile.js';
import type { Repository } from '../store/repository.js';
import { UsageError } from '../util/errors.js';
import type { DashboardSources } from '../web/DashboardServer.js';
import type { ListenAddress } from '../web/access.js';

export interface HttpOptions {
  http?: string | true;
  tokenFile?: string;
}

export const HTTP_HELP = 'serve the dashboard, /api and /metrics on <host:port> (default 127.0.0.1:8080; any other than loopback needs --token-file)';
export const TOKEN_HELP = 'a file whose first line is the bearer token every request must carry';

/** What `--http` and `--token-file` ask for, checked before anything starts: usage errors exit 2, a bad token file 1. */
export interface DashboardPlan {
  listen: ListenAddress;
  token: string | null;
}

export async function planDashboard(opts: HttpOptions): Promise<DashboardPlan> {
  const { DEFAULT_LISTEN, isLoopback, parseListen, readToken, showListen } = await import('../web/access.js');
  const listen = parseListen(typeof opts.http === 'string' ? opts.http : DEFAULT_LISTEN);
  if (!isLoopback(listen.host) && opts.tokenFile === undefined) {
    throw new UsageError(`--http ${showListen(listen)}: listening beyond this host (not a loopback address) needs --token-file`);
  }
  return { listen, token: opts.tokenFile === undefined ? null : await readToken(opts.tokenFile) };
}

/** Starts the dashboard's server as planned; resolves to its URL and a function that stops it. */
export async function serveDashboard(plan: DashboardPlan, sources: Omit<DashboardSources, 'open'>, open: (path: string) => Promise<Repository>, log: (line: string) => void): Promise<{ url: string; stop: () => Promise<void> }> {
  const [{ DashboardServer }, { showListen }] = await Promise.all([import('../web/DashboardServer.js'), import('../web/access.js')]);
  const server = new DashboardServer({ ...sources, open }, { listen: plan.listen, token: plan.token, log });
  const url = await server.start().catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`--http ${showListen(plan.listen)}: cannot listen (${err.code ?? err.message})`);
  });
  return { url, stop: () => server.stop() };
}

/** How long a repository that would not open is left alone: a wrong password is not tried (a key derived) on every request. */
const RETRY_OPEN_MS = 30_000;

/** Opens each repository once for the server's life (an encrypted one's key is derived once); a failure is tried again after RETRY_OPEN_MS. */
export function repositoryOpener(): (path: string) => Promise<Repository> {
  const open = new Map<string, { at: number; repo: Promise<Repository>; failed: boolean }>();
  return (path) => {
    const known = open.get(path);
    if (known && (!known.failed || Date.now() - known.at < RETRY_OPEN_MS)) return known.repo;
    const entry = { at: Date.now(), repo: import('../store/repository.js').then(({ Repository }) => Repository.open(path)), failed: false };
    entry.repo.catch(() => {
      entry.failed = true;
      entry.at = Date.now();
    });
    open.set(path, entry);
    return entry.repo;
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
      const plan = await planDashboard(opts);
      const { jobs, repositories } = await sortArguments(args);
      const { NO_LIVE_STATE } = await import('../web/dashboard.js');
      // Opened before listening: a password prompt comes now, not when the first page is asked for. What fails is shown on the pages.
      const open = repositoryOpener();
      for (const root of new Set([...repositories, ...jobs.map((j) => j.repository)])) await open(root).catch(() => undefined);
      const { url, stop } = await serveDashboard(plan, { jobs: () => jobs, repositories, live: NO_LIVE_STATE }, open, (line) => console.error(`vhdvault: ${line}`));
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
