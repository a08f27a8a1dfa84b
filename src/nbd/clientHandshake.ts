/**
 * The client's side of the fixed newstyle handshake, in this order:
 *
 *   greeting → client flags (FIXED_NEWSTYLE, NO_ZEROES when offered)
 *   STRUCTURED_REPLY           ACK, or an error: simple replies only
 *   SET_META_CONTEXT           (structured only) META_CONTEXT* then ACK; an error selects none
 *   GO + INFO_BLOCK_SIZE       INFO* then ACK; ERR_UNSUP falls back to EXPORT_NAME
 *
 * A server without fixed newstyle gets EXPORT_NAME straight away. Every
 * reply is framed (magic, our option echoed) and capped before its payload
 * is read: a reply claiming more than MAX_OPTION_DATA is a protocol error,
 * never an allocation. A refusal (an error reply, well framed) is an
 * NbdRequestError after a polite ABORT; anything malformed an NbdProtocolError.
 */
import type { Socket } from 'node:net';
import { HandshakeFlag, Info, nameOf, Option, OptionReply, isOptionError } from './constants.js';
import { NbdProtocolError, NbdRequestError } from './errors.js';
import type { FrameReader } from './FrameReader.js';
import {
  EXPORT_NAME_REPLY_PADDING,
  EXPORT_NAME_REPLY_SIZE,
  GREETING_SIZE,
  Malformed,
  OPTION_REPLY_HEADER_SIZE,
  encodeClientFlags,
  encodeGo,
  encodeMetaContext,
  encodeOption,
  parseExportNameReply,
  parseGreetingMagics,
  parseInfo,
  parseMetaContextReply,
  parseOptionReplyHeader,
  peerText,
} from './handshake.js';
import { MAX_OPTION_DATA, MAX_QUERIES } from './limits.js';

/** Replies one option may get before its final one: META_CONTEXT and INFO lists are short. */
const MAX_REPLIES_PER_OPTION = 64;

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ClientNegotiated {
  size: number;
  /** Transmission flags (TransmissionFlag). */
  flags: number;
  structured: boolean;
  /** Contexts the server selected: name → the id its BLOCK_STATUS chunks carry. */
  contexts: Map<string, number>;
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  blockSizes: BlockSizes | null;
}

export interface HandshakeRequest {
  exportName: string;
  /** Meta contexts to select, by exact name (e.g. base:allocation). */
  contexts: string[];
}

interface OptionReplyMessage {
  type: number;
  payload: Buffer;
}

export async function clientHandshake(socket: Socket, reader: FrameReader, request: HandshakeRequest, peer: string): Promise<ClientNegotiated> {
  const protocol = (problem: string) => new NbdProtocolError(peer, problem);
  if (request.contexts.length > MAX_QUERIES) throw new RangeError(`at most ${MAX_QUERIES} meta contexts`);

  const magics = await reader.readOrEnd(GREETING_SIZE - 2, 'greeting');
  if (magics === null) throw protocol('the server closed the connection without a greeting');
  const kind = parseGreetingMagics(magics);
  if (kind === 'not-nbd') throw protocol('not an NBD server (its greeting does not start with NBDMAGIC)');
  if (kind === 'oldstyle') throw protocol('the server speaks only the oldstyle handshake, which is not supported (it cannot name exports)');
  if (kind === 'bad-magic') throw protocol('the greeting has a bad magic (neither IHAVEOPT nor oldstyle)');
  const serverFlags = (await reader.read(2, 'greeting')).readUInt16BE(0);
  const fixed = (serverFlags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & HandshakeFlag.NO_ZEROES) !== 0;
  socket.write(encodeClientFlags((fixed ? HandshakeFlag.FIXED_NEWSTYLE : 0) | (noZeroes ? HandshakeFlag.NO_ZEROES : 0)));

  const negotiated: ClientNegotiated = { size: 0, flags: 0, structured: false, contexts: new Map(), blockSizes: null };
  // Plain newstyle knows no other option: anything else would make the server hang up.
  if (!fixed) return exportName(socket, reader, request.exportName, noZeroes, negotiated, peer);

  /** Send one option and hand each reply to `take` until it says the option is done. */
  const ask = async (option: number, data: Buffer, take: (reply: OptionReplyMessage) => boolean | Promise<boolean>) => {
    const name = nameOf(Option, option);
    socket.write(encodeOption(option, data));
    for (let n = 0; n <= MAX_REPLIES_PER_OPTION; n++) {
      const header = parseOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_SIZE, `the reply to ${name}`));
      if (!header.magicOk) throw protocol(`the reply to ${name} has a bad magic`);
      if (header.option !== option) throw protocol(`the reply to ${name} is for option ${header.option}`);
      if (header.length > MAX_OPTION_DATA) throw protocol(`the reply to ${name} claims ${header.length} bytes (at most ${MAX_OPTION_DATA})`);
      const payload = header.length > 0 ? await reader.read(header.length, `the reply to ${name}`) : Buffer.alloc(0);
      try {
        if (await take({ type: header.type, payload })) return;
      } catch (err) {
        if (err instanceof Malformed) throw protocol(err.message);
        throw err;
      }
    }
    throw protocol(`the server sent more than ${MAX_REPLIES_PER_OPTION} replies to ${name}`);
  };
  /** A reply the option cannot take: an unknown type, or ACK where a payload was due. */
  const unexpected = (option: number, reply: OptionReplyMessage) =>
    protocol(`unexpected reply ${nameOf(OptionReply, reply.type)} to ${nameOf(Option, option)}`);
  /** A well-framed refusal ends the handshake: ABORT first, as the spec asks of a client that gives up. */
  const refused = (problem: string, reply: OptionReplyMessage) => {
    socket.write(encodeOption(Option.ABORT));
    const said = peerText(reply.payload);
    return new NbdRequestError(peer, `${problem}${said ? ` (server: ${said})` : ''}`);
  };

  await ask(Option.STRUCTURED_REPLY, Buffer.alloc(0), (reply) => {
    if (reply.type === OptionReply.ACK) negotiated.structured = true;
    else if (!isOptionError(reply.type)) throw unexpected(Option.STRUCTURED_REPLY, reply);
    return true; // an error: simple replies only, and no meta contexts
  });

  if (negotiated.structured && request.contexts.length > 0) {
    const wanted = new Set(request.contexts);
    await ask(Option.SET_META_CONTEXT, encodeMetaContext({ name: request.exportName, queries: request.contexts }), (reply) => {
      if (reply.type === OptionReply.ACK) return true;
      if (isOptionError(reply.type)) {
        negotiated.contexts.clear(); // none selected; BLOCK_STATUS will not be used
        return true;
      }
      if (reply.type !== OptionReply.META_CONTEXT) throw unexpected(Option.SET_META_CONTEXT, reply);
      const { id, name } = parseMetaContextReply(reply.payload);
      if (!wanted.has(name)) throw protocol(`the server selected the meta context "${name}", which was not asked for`);
      if ([...negotiated.contexts.values()].includes(id) || negotiated.contexts.has(name)) throw protocol(`the server gave meta context id ${id} ("${name}") twice`);
      negotiated.contexts.set(name, id);
      return false;
    });
  }

  let fallBack = false;
  let sawExport = false;
  await ask(Option.GO, encodeGo({ name: request.exportName, infos: [Info.BLOCK_SIZE] }), (reply) => {
    const exportText = `export "${request.exportName}"`;
    switch (reply.type) {
      case OptionReply.INFO: {
        const info = parseInfo(reply.payload);
        if (info.kind === 'export') {
          negotiated.size = info.size;
          negotiated.flags = info.flags;
          sawExport = true;
        } else if (info.kind === 'blockSize') {
          negotiated.blockSizes = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
        }
        return false;
      }
      case OptionReply.ACK:
        if (!sawExport) throw protocol(`the server accepted GO without sending the ${exportText}'s size`);
        return true;
      case OptionReply.ERR_UNSUP:
        fallBack = true; // an older server: EXPORT_NAME does the same, without errors or block sizes
        return true;
      case OptionReply.ERR_UNKNOWN:
        throw refused(`the server has no ${exportText}`, reply);
      case OptionReply.ERR_TLS_REQD:
        throw refused(`the server requires TLS for ${exportText}, which is not supported`, reply);
      case OptionReply.ERR_SHUTDOWN:
        throw refused('the server is shutting down', reply);
      default:
        if (isOptionError(reply.type)) throw refused(`the server refused ${exportText} (${nameOf(OptionReply, reply.type)})`, reply);
        throw unexpected(Option.GO, reply);
    }
  });
  return fallBack ? exportName(socket, reader, request.exportName, noZeroes, negotiated, peer) : negotiated;
}

/** NBD_OPT_EXPORT_NAME: it has no error reply; a server that does not know the name hangs up. */
async function exportName(socket: Socket, reader: FrameReader, name: string, noZeroes: boolean, n: ClientNegotiated, peer: string): Promise<ClientNegotiated> {
  socket.write(encodeOption(Option.EXPORT_NAME, Buffer.from(name, 'utf8')));
  const reply = await reader.readOrEnd(EXPORT_NAME_REPLY_SIZE, 'the reply to EXPORT_NAME');
  if (reply === null) throw new NbdRequestError(peer, `the server hung up on EXPORT_NAME: it has no export "${name}", or refuses it`);
  try {
    Object.assign(n, parseExportNameReply(reply));
  } catch (err) {
    if (err instanceof Malformed) throw new NbdProtocolError(peer, err.message);
    throw err;
  }
  if (!noZeroes) await reader.skip(EXPORT_NAME_REPLY_PADDING, 'the reply to EXPORT_NAME');
  return n;
}
