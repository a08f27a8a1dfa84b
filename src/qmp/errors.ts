import { VaultError } from '../util/errors.js';

/**
 * Anything that goes wrong talking to QEMU's monitor. The subject is the QMP
 * socket's path, so the CLI prints `vhdvault: <socket>: <problem>` on one
 * line and exits 1. Thrown as is for a failed connect or a refused version.
 */
export class QmpError extends VaultError {
  constructor(socket: string, problem: string) {
    super(socket, oneLine(problem));
    this.name = 'QmpError';
  }

  get socket(): string {
    return this.file;
  }
}

/** QEMU sent something that is not QMP (garbage, an oversized line, an unexpected message): the connection is dropped. */
export class QmpProtocolError extends QmpError {
  constructor(socket: string, problem: string) {
    super(socket, problem);
    this.name = 'QmpProtocolError';
  }
}

/** QEMU refused one command (`{"error": …}`); the connection goes on. */
export class QmpCommandError extends QmpError {
  constructor(
    socket: string,
    readonly command: string,
    /** The arguments sent, for logs. */
    readonly args: object | undefined,
    /** QEMU's error class: GenericError nearly always, else CommandNotFound, DeviceNotFound, … */
    readonly errorClass: string,
    /** QEMU's message, as sent. */
    readonly desc: string,
  ) {
    super(socket, `${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpCommandError';
  }
}

/** The connection ended (QEMU exited, or we closed it) before the reply came: the command may or may not have run. */
export class QmpDisconnectedError extends QmpError {
  constructor(socket: string, problem: string) {
    super(socket, problem);
    this.name = 'QmpDisconnectedError';
  }
}

/** No reply or event in time. A late reply is dropped, so the command may still take effect in QEMU. */
export class QmpTimeoutError extends QmpError {
  constructor(socket: string, problem: string) {
    super(socket, problem);
    this.name = 'QmpTimeoutError';
  }
}

/** A call on a client that is not connected (closed by us, or dead). */
export class QmpStateError extends QmpError {
  constructor(socket: string, problem: string) {
    super(socket, problem);
    this.name = 'QmpStateError';
  }
}

/** QEMU's messages are one line, but nothing promises it. */
const oneLine = (text: string) => text.replace(/\s*\n\s*/g, ' ').trim();
