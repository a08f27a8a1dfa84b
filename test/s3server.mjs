// An S3 server for the tests: s3rver on 127.0.0.1.
//   node --openssl-legacy-provider test/s3server.mjs [port] [data-directory]
// Prints its endpoint (http://127.0.0.1:<port>) on one line once it listens; stops on SIGTERM.
// s3rver encrypts list continuation tokens with DES, which Node 17+ has only with the legacy
// OpenSSL provider: without it, every list longer than a page fails with a 500.
import { createCipheriv } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import S3rver from 's3rver';

try {
  createCipheriv('des', Buffer.alloc(8), Buffer.alloc(8));
} catch {
  console.error('s3server.mjs: run it with node --openssl-legacy-provider (s3rver pages lists with DES)');
  process.exit(1);
}

const port = Number(process.argv[2] ?? 0);
const given = process.argv[3];
// In memory where there is a tmpfs: s3rver writes two files per object, and a busy disk halves its speed.
// Under a test run, in the run's own folder there (VHDVAULT_TEST_SHM, see test/helpers/globalSetup.ts).
const memory = process.env.VHDVAULT_TEST_SHM ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
const directory = given ?? (await mkdtemp(join(memory, 'vhdvault-s3rver-')));
const server = new S3rver({ address: '127.0.0.1', port, silent: true, directory });
const address = await server.run();
console.log(`http://127.0.0.1:${address.port}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  // Whatever holds it open, it does not outlive the run that started it.
  setTimeout(() => process.exit(0), 3000).unref();
  // Kept-alive client connections would hold close() open.
  server.httpServer.closeAllConnections();
  await server.close().catch(() => undefined);
  if (given === undefined) await rm(directory, { recursive: true, force: true });
  process.exit(0);
}
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
// Orphaned (its test run was killed): stop rather than linger.
const parent = process.ppid;
setInterval(() => process.ppid !== parent && stop(), 1000).unref();
