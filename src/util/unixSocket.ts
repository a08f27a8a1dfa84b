import { lstat } from 'node:fs/promises';
import { connect } from 'node:net';

/**
 * What is at a Unix socket path: a server that accepts connections, a socket
 * file nobody listens on any more (what a killed server leaves), or neither.
 */
export async function socketState(path: string): Promise<'listening' | 'stale' | 'none'> {
  const s = await lstat(path).catch(() => null);
  if (!s?.isSocket()) return 'none';
  return new Promise((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve('listening');
    });
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED' ? 'stale' : 'none'));
  });
}
