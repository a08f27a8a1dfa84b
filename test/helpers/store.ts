/**
 * Test set-up through the store's own API, in this process: building a chain
 * of backups this way costs no CLI start-up per backup. Use it for what a test
 * needs in place before the behaviour it checks, which the test still drives
 * through the built CLI.
 */
import { backup, type BackupOptions } from '../../src/store/backup.js';
import { listBackups } from '../../src/store/list.js';
import { type LayoutName as Layout, type Location, Repository } from '../../src/store/repository.js';
import type { Compression } from '../../src/vhd/compression.js';
import { readFile, writeFile } from 'node:fs/promises';
import { openStorage } from '../../src/storage/open.js';
import { expect } from 'vitest';
import type { Cipher } from '../../src/crypto/aead.js';
import { type BackupMetadata, metadataText } from '../../src/store/metadata.js';

/**
 * `vhdvault init <root> --layout <layout> [--compression <codec>] [--encryption <cipher>]`.
 * An encrypted repository takes its password from VHDVAULT_PASSWORD (see `useTestPassword`).
 */
export async function initRepo(root: string, layout: Layout, compression: Compression = 'none', encryption?: Cipher): Promise<void> {
  await Repository.init(root, { layout, compression, ...(encryption ? { encryption } : {}) });
}

/** The password of the tests' encrypted repositories. */
export const TEST_PASSWORD = 'correct horse battery staple';

/**
 * Make this process, and every CLI it starts (helpers/cli.ts passes process.env on),
 * open encrypted repositories with TEST_PASSWORD, with cheap key derivation.
 */
export function useTestPassword(): void {
  Object.assign(process.env, { VHDVAULT_PASSWORD: TEST_PASSWORD, VHDVAULT_TEST_SCRYPT_N: '1024' });
}

/**
 * The repository at `root` (a folder or an S3 location) really is encrypted: its configuration
 * says so and one disk's backup metadata is stored as a sealed envelope (its first bytes `VVE` 1),
 * not JSON. Read from the storage beneath the repository's sealing.
 */
export async function expectEncrypted(root: string | Location, disk = 'vm'): Promise<void> {
  const raw = await openStorage((await Repository.open(root)).storage.descriptor);
  const config = JSON.parse((await raw.get('vhdvault.json')).toString('utf8')) as { encryption?: { cipher: string } };
  expect(config.encryption?.cipher ?? 'none', 'the encryption vhdvault.json names').toMatch(/^(aes-256-gcm|chacha20-poly1305)$/);
  const meta = (await raw.list(`disks/${disk}`)).find((f) => /^[^.].*\.json$/.test(f));
  expect(meta, `a backup's metadata in disks/${disk}`).toBeDefined();
  const head = (await raw.get(`disks/${disk}/${meta}`)).subarray(0, 4);
  expect(head.toString('latin1'), `${meta} starts sealed`).toBe('VVE\x01');
}

/**
 * `vhdvault backup <root> <disk> --source <source> [--full]`; resolves to the new
 * backup's id. One worker thread unless told otherwise: set-up backups are small,
 * and starting a second thread per backup costs more than it saves.
 */
export async function backupOf(root: string | Location, disk: string, source: string, options: Omit<BackupOptions, 'source'> = {}): Promise<string> {
  const report = await backup(await Repository.open(root), disk, { source, concurrency: 1, ...options });
  return report.id;
}

export interface ListedBackup {
  disk: string;
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
}

/** What `vhdvault list <root> [disk] --json` lists (the same listing, read in this process). */
export async function listed(root: string, disk?: string): Promise<ListedBackup[]> {
  const { backups } = await listBackups(await Repository.open(root), disk);
  return backups.map(({ disk, id, kind, parent }) => ({ disk, id, kind, parent }));
}

/**
 * Change fields of a backup's metadata file as if vhdvault had written them
 * (sealed again): for tests that set up a state (dates spread over days, a
 * parent named wrongly but consistently), not for tests of damage.
 */
export async function rewriteMetadata(path: string, edit: (meta: BackupMetadata) => BackupMetadata | void): Promise<void> {
  const meta = JSON.parse(await readFile(path, 'utf8')) as BackupMetadata;
  await writeFile(path, metadataText(edit(meta) ?? meta));
}
