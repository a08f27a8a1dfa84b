import cliProgress from 'cli-progress';

export interface Progress {
  update(done: number, total: number, bytes: number): void;
  stop(): void;
}

const silent: Progress = { update: () => undefined, stop: () => undefined };

const mib = (bytes: number) => (bytes / 1048576).toFixed(0);

/** A progress bar on stderr (bytes, rate, ETA), only when stderr is a terminal and output is not JSON. */
export function progressBar(label: string, json: boolean): Progress {
  if (json || !process.stderr.isTTY) return silent;
  const started = performance.now();
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {mib} MiB read | {rate} MiB/s | ETA {eta_formatted}`,
      hideCursor: true,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let startedBar = false;
  return {
    update(done, total, bytes) {
      const seconds = (performance.now() - started) / 1000;
      const payload = { mib: mib(bytes), rate: seconds > 0 ? mib(bytes / seconds) : '0' };
      if (!startedBar) {
        bar.start(total, done, payload);
        startedBar = true;
      } else bar.update(done, payload);
    },
    stop() {
      if (startedBar) bar.stop();
    },
  };
}
