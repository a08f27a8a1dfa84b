/**
 * The real Linux guest for test files (src/demo/guest.ts, which `npm start`
 * and the bench boot too): everything it exports, with every guest a file
 * booted killed, and its folder removed, after the file. Outside CI the tests
 * that need it are skipped, with the reason in their title, when a package is
 * missing; under CI (which installs them) a missing package is an error.
 */
import { afterAll } from 'vitest';
import { guestMissing, stopGuests } from '../../src/demo/guest.js';

export * from '../../src/demo/guest.js';

if (guestMissing !== undefined && process.env.CI) throw new Error(`${guestMissing} (CI must install them: .ci/run)`);

/** Why the guest's tests are skipped here, or undefined. */
export const guestSkip = guestMissing;

/** A suite's title, with the reason when it is skipped. */
export const guestTitle = (name: string) => (guestSkip === undefined ? name : `${name} [skipped: ${guestSkip}]`);

// Registered when a test file imports this module (while vitest collects it), so it applies to the whole file.
afterAll(stopGuests);
