/**
 * The S3 servers of s3Server.ts for test files: each engine's server started
 * once per file and stopped after it.
 */
import { afterAll } from 'vitest';
import { cephMissing, type S3Server, startCeph, startS3 } from './s3Server.js';

export * from './s3Server.js';

/** An S3 engine the tests run against. */
export interface S3Engine {
  name: 's3rver' | 'ceph';
  /** Why this engine's tests are skipped here (its programs are missing, outside CI), else undefined: for describe.skipIf. */
  skip: string | undefined;
  /** What to name its tests' suite: the name, and the reason when they are skipped. */
  title: string;
  /** Its server for this test file: started at the first call and stopped after the file (CI's shared one is only used). */
  server(): Promise<S3Server>;
}

const started: Array<Promise<S3Server>> = [];
// Registered when a test file imports this module (while vitest collects it), so it applies to the whole file.
afterAll(async () => {
  await Promise.all(started.splice(0).map(async (s) => (await s.catch(() => null))?.close()));
});

function engine(name: S3Engine['name'], start: () => Promise<S3Server>, skip: string | undefined): S3Engine {
  let server: Promise<S3Server> | undefined;
  return {
    name,
    skip,
    title: skip === undefined ? name : `${name} [skipped: ${skip}]`,
    server() {
      if (server === undefined) started.push((server = start()));
      return server;
    },
  };
}

/**
 * The S3 engines, for `describe.each` or a loop of `describe.skipIf(engine.skip)`: s3rver (a
 * Node server, fast) and Ceph's RADOS Gateway (a real distributed store: conditional writes,
 * its own listing and error behaviour). Without Ceph installed and no shared endpoint, Ceph's
 * tests are skipped with the reason in their title; under CI, where .ci/run installs and starts
 * it, a missing Ceph fails the file instead.
 */
export function s3Engines(): S3Engine[] {
  const missing = cephMissing();
  if (missing !== undefined && process.env.CI) throw new Error(`Ceph is needed under CI: ${missing}`);
  return [engine('s3rver', startS3, undefined), engine('ceph', startCeph, missing)];
}
