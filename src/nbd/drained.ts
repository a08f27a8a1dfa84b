import type { Socket } from 'node:net';

/** Resolves once the socket's buffered writes are sent, or it closed (then nothing will drain it). */
export function drained(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.once('drain', done);
    socket.once('close', done);
  });
}
