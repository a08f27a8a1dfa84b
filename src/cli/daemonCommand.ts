import { Command } from 'commander';
import type { DaemonEvent } from '../jobs/daemon.js';
import { UsageError } from '../util/errors.js';
import { JSON_FORMATS, printJsonLine } from './json.js';

/** `vhdvault daemon <folder-or-file>...`: the jobs on their schedules, one event per line, until SIGTERM/SIGINT. */
export function daemonCommand(): Command {
  return new Command('daemon')
    .description('run every job (job files, or folders of *.yaml) on its schedule until SIGTERM; SIGHUP reloads the job files')
    .argument('<folder-or-file...>')
    .option('--json', 'one JSON object per event')
    .action(async (paths: string[], opts: { json?: boolean }) => {
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
      await stopped;
    });
}
