import { connect } from 'node:net';

/** Resolves once a connection to the Unix socket succeeds: polls, since a server creates it when it is ready. */
export async function accepts(socket: string, withinMs = 10_000): Promise<void> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(socket);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing accepts connections on ${socket} after ${withinMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
