import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';

/**
 * CLI tests drive the built binary exactly as users do: build it once first.
 * Incrementally (the build info lives in dist/, so it goes when dist/ goes):
 * a run after a small change recompiles what changed instead of everything,
 * and tsc runs directly rather than through npx.
 */
export default function setup(): void {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--incremental', '--tsBuildInfoFile', 'dist/.tsbuildinfo-tests'], { stdio: 'inherit' });
}
