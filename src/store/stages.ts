/** Per-stage figures of a backup: how much each stage moved and how long it was busy. */
export interface StageFigures {
  bytes: number;
  /** Wall-clock time the stage had work in progress (worker stages: thread time ÷ threads). */
  busyMs: number;
  /** bytes ÷ busy time: the rate this stage sustains when it is the bottleneck. */
  bytesPerSecond: number;
}

export const STAGES = ['read', 'digest', 'compress', 'write'] as const;
export type Stage = (typeof STAGES)[number];

/** Wall-clock busy time of a stage whose operations may overlap. */
export class BusyClock {
  private inFlight = 0;
  private since = 0;
  busyMs = 0;
  bytes = 0;

  async time<T>(fn: () => Promise<T>): Promise<T> {
    if (this.inFlight++ === 0) this.since = performance.now();
    try {
      return await fn();
    } finally {
      if (--this.inFlight === 0) this.busyMs += performance.now() - this.since;
    }
  }
}

export function figures(bytes: number, busyMs: number): StageFigures {
  return { bytes, busyMs: Math.round(busyMs), bytesPerSecond: busyMs > 0 ? Math.round((bytes / busyMs) * 1000) : 0 };
}

/** The stage with the most busy time: the one that bounds the backup. */
export function slowest(stages: Record<Stage, StageFigures>): Stage {
  return STAGES.reduce((a, b) => (stages[b].busyMs > stages[a].busyMs ? b : a));
}
