import { createRequire } from 'node:module';
import { Interrupted, reportInterrupt } from './run.js';

export interface Progress {
  update(done: number, total: number, bytes: number): void;
  stop(): void;
}

const silent: Progress = { update: () => undefined, stop: () => undefined };

const mib = (bytes: number) => (bytes / 1048576).toFixed(0);

/** cli-progress hides the cursor while it draws; this shows it again. */
const SHOW_CURSOR = '\x1b[?25h';
/** After a signal, how long the command may unwind through its abort paths (temp files removed) before it is cut short. */
const GRACE_MS = 3000;
const SIGNALS = ['SIGINT', 'SIGTERM'] as const;

/**
 * A progress bar on stderr (bytes, rate, ETA), only when stderr is a terminal and output is not JSON.
 * While it shows, SIGINT/SIGTERM give the terminal back (bar ended, cursor shown) and make the next
 * update() throw Interrupted, so the command aborts the way it does on any error; one that does not
 * unwind within GRACE_MS exits anyway. Either way: `vhdvault: interrupted`, exit 128 + signal.
 */
export function progressBar(label: string, json: boolean, verb = 'read'): Progress {
  if (json || !process.stderr.isTTY) return silent;
  // Loaded only for a terminal: it costs ~45 ms at start-up, which scripts and the tests' hundreds of runs need not pay.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof import('cli-progress');
  const started = performance.now();
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {mib} MiB ${verb} | {rate} MiB/s | ETA {eta_formatted}`,
      hideCursor: true,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let shown = false;
  let signalled: NodeJS.Signals | null = null;
  const end = () => {
    if (!shown) return;
    shown = false;
    for (const signal of SIGNALS) process.off(signal, onSignal);
    bar.stop();
    process.stderr.write(SHOW_CURSOR);
  };
  // Our listeners are gone once the bar ends, so a second signal terminates at once.
  const onSignal = (signal: NodeJS.Signals) => {
    signalled = signal;
    end();
    setTimeout(() => process.exit(reportInterrupt(signal)), GRACE_MS).unref();
  };
  return {
    update(done, total, bytes) {
      if (signalled) throw new Interrupted(signalled);
      const seconds = (performance.now() - started) / 1000;
      const payload = { mib: mib(bytes), rate: seconds > 0 ? mib(bytes / seconds) : '0' };
      if (!shown) {
        shown = true;
        for (const signal of SIGNALS) process.on(signal, onSignal);
        bar.start(total, done, payload);
      } else bar.update(done, payload);
    },
    stop: end,
  };
}
