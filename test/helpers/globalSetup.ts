import { execFileSync } from 'node:child_process';

/** CLI tests drive the built binary exactly as users do: build it once first. */
export default function setup(): void {
  execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
}
