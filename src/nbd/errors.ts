import { VaultError } from '../util/errors.js';
import { Errno } from './constants.js';

/**
 * The peer broke the protocol (bad magic, impossible length, a reply to no
 * request) or the connection failed: the connection cannot continue. `peer`
 * names the other side (a URI, or the client's address).
 */
export class NbdProtocolError extends VaultError {
  constructor(peer: string, problem: string) {
    super(peer, problem);
    this.name = 'NbdProtocolError';
  }
}

/** The server refused one request or option; the connection goes on. */
export class NbdRequestError extends VaultError {
  constructor(
    peer: string,
    problem: string,
    /** The wire errno (Errno), for commands. */
    readonly errno: number = Errno.EIO,
  ) {
    super(peer, problem);
    this.name = 'NbdRequestError';
  }
}

/** Thrown by an export to refuse one request with a given errno (a read past the end, a write to a read-only export). */
export class ExportError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'ExportError';
  }
}

/** The wire errno for anything an export throws: its own, else EIO (the cause is logged, not sent). */
export function errnoOf(err: unknown): number {
  if (err instanceof ExportError) return err.errno;
  const code = (err as NodeJS.ErrnoException)?.code;
  if (code === 'ENOSPC') return Errno.ENOSPC;
  if (code === 'ENOMEM') return Errno.ENOMEM;
  if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return Errno.EPERM;
  return Errno.EIO;
}

const ERRNO_TEXT: Record<number, string> = {
  [Errno.EPERM]: 'operation not permitted',
  [Errno.EIO]: 'input/output error',
  [Errno.ENOMEM]: 'out of memory',
  [Errno.EINVAL]: 'invalid argument',
  [Errno.ENOSPC]: 'no space left on device',
  [Errno.EOVERFLOW]: 'value too large',
  [Errno.ENOTSUP]: 'operation not supported',
  [Errno.ESHUTDOWN]: 'server is shutting down',
};

export const describeErrno = (errno: number) => ERRNO_TEXT[errno] ?? `error ${errno}`;
