// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { expect, it } from 'vitest';
import { faults, faultSuite } from './helpers/faultSuite.js';

// The list: every kind of file a repository holds gets a fault.
it('the fault table covers every kind of file of a vhd-layout repository', () => {
  const names = faults('vhd').map((f) => f.name).join(' | ');
  for (const kind of ['metadata', 'digests', 'lock', 'journal', 'footer', 'header', 'bat', 'block']) expect(names).toContain(kind);
});

faultSuite('vhd');
