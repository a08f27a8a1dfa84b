import { randomBytes } from 'node:crypto';
import { UsageError } from '../util/errors.js';
import { deriveKey, paramsProblem, SCRYPT_LIMITS, type ScryptParams } from './keyFile.js';

/**
 * How costly new key files' scrypt is: calibrated so one derivation takes about
 * half a second on this machine — each password guess costs an attacker that
 * much of a similar machine, and opening a repository costs the user no more.
 * Measured once per process, at a small N, then extrapolated (scrypt's time is
 * linear in N), so calibrating costs ~0.1 s rather than a search of several seconds.
 */

export const TARGET_MS = 500;
/** The N measured: small enough to be quick, large enough (~0.1 s here) for a stable time. */
export const PROBE_LOG_N = 14;
/** However slow (or loaded) the machine, never below this: 2^15 is the usual interactive minimum. */
export const MIN_LOG_N = 15;
const R = 8;
const P = 1;

/**
 * Test-only: a fixed N for key files made by this process (a power of two,
 * 2^10 or more), so tests and spawned CLIs derive in milliseconds. Never set it in production.
 */
export const TEST_N_ENV = 'VHDVAULT_TEST_SCRYPT_N';

/** Milliseconds one derivation with `params` takes. */
export type Measure = (params: ScryptParams) => Promise<number>;

let calibrated: Promise<ScryptParams> | undefined;

/** Parameters for a new key file: `override`, else the test variable, else this machine's calibration (measured once). */
export function scryptParams(override?: ScryptParams): Promise<ScryptParams> {
  if (override) return Promise.resolve(override);
  const fromEnv = process.env[TEST_N_ENV];
  if (fromEnv !== undefined && fromEnv !== '') return Promise.resolve(testParams(fromEnv));
  // A failed measurement is not remembered: the next key file measures again.
  calibrated ??= calibrateScrypt().catch((err: unknown) => {
    calibrated = undefined;
    throw err;
  });
  return calibrated;
}

/** Measure one derivation at the probe N and scale N to `targetMs`. */
export async function calibrateScrypt(options: { targetMs?: number; measure?: Measure } = {}): Promise<ScryptParams> {
  const { targetMs = TARGET_MS, measure = timeDerivation } = options;
  const probeMs = await measure({ N: 2 ** PROBE_LOG_N, r: R, p: P });
  return { N: 2 ** chooseLogN(probeMs, targetMs), r: R, p: P };
}

/** log2 N whose time is nearest `targetMs` (nearest in ratio, not in ms), within [MIN_LOG_N, the key file limit]. */
export function chooseLogN(probeMs: number, targetMs: number): number {
  // A zero or absurd time (a coarse clock, an injected one) means "very fast": the top of the range.
  const ideal = probeMs > 0 && Number.isFinite(probeMs) ? PROBE_LOG_N + Math.log2(targetMs / probeMs) : Infinity;
  return Math.min(SCRYPT_LIMITS.maxLogN, Math.max(MIN_LOG_N, Math.round(ideal)));
}

/** The real clock: one derivation of a throwaway password. */
export async function timeDerivation(params: ScryptParams): Promise<number> {
  const start = process.hrtime.bigint();
  (await deriveKey('calibration', randomBytes(16), params)).fill(0);
  return Number(process.hrtime.bigint() - start) / 1e6;
}

function testParams(text: string): ScryptParams {
  const params = { N: /^\d+$/.test(text) ? Number(text) : NaN, r: R, p: P };
  const problem = paramsProblem(params);
  if (problem !== null) throw new UsageError(`${TEST_N_ENV}=${text}: ${problem.replace('kdf.N', 'N')}`);
  return params;
}
