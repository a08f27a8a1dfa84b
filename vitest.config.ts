import { readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/** The first line of a test file that runs long: `// vitest: slow` (a reason may follow). */
const SLOW = /^\/\/ vitest: slow\b/;

/**
 * Vitest starts the files it has timed before longest first; with no timings (a
 * fresh checkout, as in CI) it starts larger files first. The files that run
 * longest are small ones (kill loops, QEMU, rate limits): they would come last,
 * one worker running them while the others have nothing left to do. So until
 * every file marked slow has a timing, the marked files go first, in vitest's
 * order among themselves. The mark is read from each file, no list of names.
 */
class SlowFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    const timed = (f: TestSpecification) => this.ctx.cache.getFileTestResults(`${f.project.name}:${relative(this.ctx.config.root, f.moduleId)}`) !== undefined;
    const slow = new Set(sorted.filter((f) => SLOW.test(readFileSync(f.moduleId, 'utf8').slice(0, 200))));
    if ([...slow].every(timed)) return sorted;
    return [...sorted.filter((f) => slow.has(f)), ...sorted.filter((f) => !slow.has(f))];
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
    sequence: { sequencer: SlowFirst },
  },
});
