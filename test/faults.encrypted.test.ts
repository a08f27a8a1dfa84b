// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { expect, it } from 'vitest';
import { faults, faultSuite } from './helpers/faultSuite.js';
import { useTestPassword } from './helpers/store.js';

// The fault table of faults.dir.test.ts on an encrypted repository (the vhd layout cannot be
// encrypted). Every file but the configuration, the key files and the coordination files is
// sealed: a damaged one fails authentication, and each fault must still be named by file.
useTestPassword();

it('the fault table covers every kind of file of an encrypted dir-layout repository', () => {
  const names = faults('dir', true).map((f) => f.name).join(' | ');
  for (const kind of ['metadata', 'digests', 'lock', 'journal', 'footer', 'header', 'bat', 'block']) expect(names).toContain(kind);
});

faultSuite('dir', 'aes-256-gcm');
