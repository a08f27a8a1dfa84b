/**
 * A libvirt domain's guest agent, reached through libvirt: libvirt holds the
 * agent channel's socket for itself, so vhdvault cannot connect to it as it
 * does to a QEMU chardev (GuestAgent). Each command goes through
 * `virsh qemu-agent-command`, which synchronises with the agent itself and
 * times out with our limit. The same surface as GuestAgent, for quiescing.
 */
import { DEFAULT_AGENT_TIMEOUT_MS } from '../qmp/GuestAgent.js';
import { QmpCommandError, QmpProtocolError, QmpTimeoutError } from '../qmp/errors.js';
import { onDomain } from './libvirtDomain.js';
import { VirshError } from './virsh.js';

export class VirshAgent {
  /** What messages name the agent by: the domain, where GuestAgent names its socket. */
  readonly socketPath: string;

  constructor(
    readonly connect: string,
    readonly domain: string,
    private readonly timeoutMs = DEFAULT_AGENT_TIMEOUT_MS,
  ) {
    this.socketPath = `domain "${domain}" (guest agent through libvirt, ${connect})`;
  }

  /** Run `command`; resolves to its `return` value. */
  async execute<T = unknown>(command: string, args?: object): Promise<T> {
    const json = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    const seconds = String(Math.max(1, Math.ceil(this.timeoutMs / 1000)));
    let out: string;
    try {
      // virsh's own limit is the agent's; ours (a little longer) is for libvirt itself.
      out = await onDomain(this.connect, this.domain, ['qemu-agent-command', this.domain, json, '--timeout', seconds], this.timeoutMs + 15_000);
    } catch (err) {
      if (!(err instanceof VirshError)) throw err;
      if (/timed out|timeout/i.test(err.said)) throw new QmpTimeoutError(this.socketPath, `${command}: the guest agent did not answer within ${seconds} s (is qemu-ga running in the guest?): ${err.said}`);
      throw new QmpCommandError(this.socketPath, command, args, 'libvirt', err.said);
    }
    let reply: unknown;
    try {
      reply = JSON.parse(out);
    } catch {
      throw new QmpProtocolError(this.socketPath, `${command}: virsh printed something that is not JSON`);
    }
    if (reply === null || typeof reply !== 'object' || !('return' in reply)) throw new QmpProtocolError(this.socketPath, `${command}: a reply without return`);
    return (reply as { return: T }).return;
  }

  /** Nothing to close: every command is its own virsh. */
  close(): void {}
}
