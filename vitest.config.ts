import { relative } from 'node:path';
import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * The files that run longest, longest first (seconds of one worker each). Vitest
 * starts the files it has timed before longest first; with no timings (a fresh
 * checkout, as in CI) it starts larger files first, and these are small files:
 * they would come last, one worker running them while the other has nothing
 * left to do. So until every one of them has a timing, they go first.
 */
const LONGEST_FIRST = [
  'test/pruneKillRandom.test.ts',
  'test/pruneKillSweep.test.ts',
  'test/objectStore.test.ts',
  'test/repository.test.ts',
  'test/crash.test.ts',
  'test/liveBackupKills.test.ts',
  'test/trust.test.ts',
  'test/replicate.test.ts',
  'test/faults.dir.test.ts',
  'test/prune.test.ts',
  'test/badInput.test.ts',
  'test/jobRun.test.ts',
  'test/s3Cli.test.ts',
];

class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    const path = (f: TestSpecification) => relative(this.ctx.config.root, f.moduleId);
    const timed = (f: TestSpecification) => this.ctx.cache.getFileTestResults(`${f.project.name}:${path(f)}`) !== undefined;
    const known = sorted.filter((f) => LONGEST_FIRST.includes(path(f)));
    if (known.every(timed)) return sorted;
    const rank = (f: TestSpecification) => (LONGEST_FIRST.includes(path(f)) ? LONGEST_FIRST.indexOf(path(f)) : LONGEST_FIRST.length);
    return sorted.map((f, i) => ({ f, i })).sort((a, b) => rank(a.f) - rank(b.f) || a.i - b.i).map(({ f }) => f);
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/globalSetup.ts'],
    // Guards against a hang, not performance checks: the kill tests take 40–120 s each on a
    // loaded 2-core machine, and a limit they can reach under load is a flaky test.
    testTimeout: 300_000,
    hookTimeout: 300_000,
    // Tests create large sparse files and spawn the CLI, and many wait (on rate limits, QEMU,
    // schedules): three files at once keep two cores busy (measured: 2 workers took 12.8 min).
    maxWorkers: 3,
    minWorkers: 1,
    sequence: { sequencer: LongestFirst },
  },
});
