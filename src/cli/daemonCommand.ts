import { Command } from 'commander';
import type { DaemonEvent } from '../jobs/daemon.js';
import { UsageError } from '../util/errors.js';
import { HTTP_HELP, type HttpOptions, planDashboard, repositoryOpener, serveDashboard, TOKEN_HELP } from './dashboardCommand.js';
import { JSON_FORMATS, printJsonLine } from './json.js';

/** `vhdvault daemon <folder-or-file>...`: the jobs on their schedules, one event per line, until SIGTERM/SIGINT. */
export function daemonCommand(): Command {
  return new Command('daemon')
    .description('run every job (job files, or folders of *.yaml) on its schedule until SIGTERM; SIGHUP reloads the job files')
    .argument('<folder-or-file...>')
    .option('--json', 'one JSON object per event')
    .option('--http [host:port]', HTTP_HELP)
    .option('--token-file <file>', TOKEN_HELP)
    .action(async (paths: string[], opts: { json?: boolean } & HttpOptions) => {
      if (opts.tokenFile !== undefined && opts.http === undefined) throw new UsageError('--token-file is for the dashboard: give --http too');
      // Before any job is loaded or scheduled: a bad address or token file stops nothing that started.
      const plan = opts.http === undefined ? null : await planDashboard(opts);
      const loaded = { count: 0 };
      const emit = (e: DaemonEvent) => {
        if (e.event === 'loaded') loaded.count++;
        if (opts.json) printJsonLine(JSON_FORMATS.daemonEvent, { time: new Date().toISOString(), ...e });
        else console.log(`${new Date().toISOString()} ${e.message}`);
      };
      // Loaded here: job files need zod, yaml and croner, which no other command should pay for.
      const { JobDaemon } = await import('../jobs/daemon.js');
      const daemon = new JobDaemon(paths, emit);
      // Signals are ours from the start: one arriving while the job files load (just after a
      // "missed" line, say) must stop the daemon cleanly, not kill it. It takes effect once they are loaded.
      let started: Promise<void> = Promise.resolve();
      const stopped = new Promise<void>((resolve) => {
        const onHup = () => void started.then(() => daemon.reload());
        const onStop = () => {
          process.off('SIGHUP', onHup);
          void started.then(() => daemon.stop()).then(resolve);
        };
        process.on('SIGHUP', onHup);
        process.once('SIGTERM', onStop);
        process.once('SIGINT', onStop);
      });
      started = daemon.start();
      await started;
      if (loaded.count === 0) throw new UsageError(`no valid job in ${paths.join(', ')}`);
      let dashboard: { stop: () => Promise<void> } | null = null;
      if (plan !== null) {
        const sources = {
          jobs: () => daemon.scheduledJobs(),
          repositories: [],
          live: { running: (job: string) => daemon.running(job), nextRun: (job: string) => daemon.nextRun(job) },
          runNow: (job: string) => daemon.runNow(job),
        };
        try {
          const served = await serveDashboard(plan, sources, repositoryOpener(), (line) => console.error(`vhdvault: ${line}`));
          dashboard = served;
          emit({ event: 'listening', message: `dashboard at ${served.url}` });
        } catch (err) {
          await daemon.stop();
          throw err;
        }
      }
      await stopped;
      await dashboard?.stop();
    });
}
