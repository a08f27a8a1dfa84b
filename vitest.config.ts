import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/globalSetup.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Tests create large sparse files and spawn the CLI; two cores.
    maxWorkers: 2,
    minWorkers: 1,
  },
});
