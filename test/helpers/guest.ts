/**
 * The real Linux guest for test files (guestVm.ts): everything it exports,
 * with every guest a file booted killed, and its folder removed, after the file.
 */
import { afterAll } from 'vitest';
import { stopGuests } from './guestVm.js';

export * from './guestVm.js';

// Registered when a test file imports this module (while vitest collects it), so it applies to the whole file.
afterAll(stopGuests);
