/**
 * The server's side of the fixed newstyle handshake: greeting, then the
 * option loop until EXPORT_NAME or GO picks an export (opened only then).
 * A malformed payload gets NBD_REP_ERR_INVALID and the loop goes on; a
 * broken frame (bad magic, oversized option) ends the connection.
 */
import type { Socket } from 'node:net';
import { BASE_ALLOCATION, HandshakeFlag, Info, Option, OptionReply, TransmissionFlag } from './constants.js';
import { NbdProtocolError } from './errors.js';
import type { ExportCatalog, NbdExport } from './export.js';
import type { FrameReader } from './FrameReader.js';
import {
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoText,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeString,
  Malformed,
  OPTION_HEADER_SIZE,
  parseGo,
  parseMetaContext,
  parseOptionHeader,
} from './handshake.js';
import { MAX_OPTION_DATA, MAX_OPTIONS, MAX_REQUEST, MAX_STRING } from './limits.js';

/** The one meta context we serve, and the id it gets. */
export const ALLOCATION_CONTEXT_ID = 1;

export interface Negotiated {
  name: string;
  export: NbdExport;
  structured: boolean;
  /** Selected by SET_META_CONTEXT for this export: only base:allocation exists here. */
  allocationContext: boolean;
}

const KNOWN_CLIENT_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES;

export function transmissionFlags(exp: NbdExport): number {
  let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE;
  if (!exp.writable) flags |= TransmissionFlag.READ_ONLY;
  if (exp.writable && exp.trim) flags |= TransmissionFlag.SEND_TRIM;
  if (exp.writable && exp.writeZeroes) flags |= TransmissionFlag.SEND_WRITE_ZEROES;
  return flags;
}

/** Which contexts a query names: "base:allocation" itself, "base:" (all of base), or for LIST no query at all. */
function matches(query: string): boolean {
  return query === BASE_ALLOCATION || query === 'base:';
}

/** An export the catalog cannot open (a damaged backup) is refused like an unknown one, with the reason. */
async function lookup(catalog: ExportCatalog, name: string): Promise<NbdExport | string> {
  try {
    return (await catalog.open(name)) ?? `no export named "${name}"`;
  } catch (err) {
    return `export "${name}" cannot be opened: ${(err as Error)?.message ?? String(err)}`;
  }
}

/**
 * The handshake, up to the export the client chose (null: it left or aborted).
 * `admit` is asked when it chooses one: a reason says the server is full, and
 * GO gets NBD_REP_ERR_POLICY with it (the old EXPORT_NAME has no error reply:
 * the connection is closed).
 */
export async function negotiate(socket: Socket, reader: FrameReader, catalog: ExportCatalog, peer: string, admit: () => string | null): Promise<Negotiated | null> {
  socket.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  const clientFlags = (await reader.read(4, 'client flags')).readUInt32BE(0);
  if ((clientFlags & HandshakeFlag.FIXED_NEWSTYLE) === 0) throw new NbdProtocolError(peer, 'client does not speak the fixed newstyle handshake');
  if ((clientFlags & ~KNOWN_CLIENT_FLAGS) !== 0) throw new NbdProtocolError(peer, `client sent unknown handshake flags 0x${clientFlags.toString(16)}`);
  const noZeroes = (clientFlags & HandshakeFlag.NO_ZEROES) !== 0;
  let structured = false;
  /** The export SET_META_CONTEXT selected base:allocation for, if it did. */
  let contextFor: string | null = null;

  for (let n = 0; n < MAX_OPTIONS; n++) {
    const header = await reader.readOrEnd(OPTION_HEADER_SIZE, 'option header');
    if (header === null) return null;
    const { magicOk, option, length } = parseOptionHeader(header);
    if (!magicOk) throw new NbdProtocolError(peer, 'option has a bad magic');
    if (length > MAX_OPTION_DATA) throw new NbdProtocolError(peer, `option ${option} carries ${length} bytes (at most ${MAX_OPTION_DATA})`);
    const data = await reader.read(length, 'option data');
    const reply = (type: number, payload?: Buffer) => socket.write(encodeOptionReply(option, type, payload));
    const refuse = (type: number, message: string) => reply(type, Buffer.from(message.slice(0, MAX_STRING), 'utf8'));
    try {
      switch (option) {
        case Option.EXPORT_NAME: {
          if (length > MAX_STRING) throw new NbdProtocolError(peer, 'export name is too long');
          const name = data.toString('utf8');
          const exp = await lookup(catalog, name);
          // The old option has no error reply: the spec's answer to an unknown export is to hang up.
          if (typeof exp === 'string') throw new NbdProtocolError(peer, exp);
          if (admit() !== null) return null;
          socket.write(encodeExportNameReply(exp.size, transmissionFlags(exp), noZeroes));
          return { name, export: exp, structured, allocationContext: structured && contextFor === name };
        }
        case Option.ABORT:
          reply(OptionReply.ACK);
          return null;
        case Option.LIST: {
          if (length !== 0) throw new Malformed('LIST carries no data');
          for (const e of await catalog.list()) reply(OptionReply.SERVER, Buffer.concat([encodeString(e.name), Buffer.from(e.description, 'utf8')]));
          reply(OptionReply.ACK);
          break;
        }
        case Option.INFO:
        case Option.GO: {
          const req = parseGo(data);
          const exp = await lookup(catalog, req.name);
          if (typeof exp === 'string') {
            refuse(OptionReply.ERR_UNKNOWN, exp);
            break;
          }
          const full = option === Option.GO ? admit() : null;
          if (full !== null) {
            refuse(OptionReply.ERR_POLICY, full);
            break;
          }
          reply(OptionReply.INFO, encodeInfoExport(exp.size, transmissionFlags(exp)));
          reply(OptionReply.INFO, encodeInfoBlockSize(1, 4096, MAX_REQUEST));
          if (req.infos.includes(Info.NAME)) reply(OptionReply.INFO, encodeInfoText(Info.NAME, req.name));
          reply(OptionReply.ACK);
          if (option === Option.GO) return { name: req.name, export: exp, structured, allocationContext: structured && contextFor === req.name };
          break;
        }
        case Option.STRUCTURED_REPLY:
          if (length !== 0) throw new Malformed('STRUCTURED_REPLY carries no data');
          structured = true;
          reply(OptionReply.ACK);
          break;
        case Option.LIST_META_CONTEXT:
        case Option.SET_META_CONTEXT: {
          if (!structured) {
            refuse(OptionReply.ERR_INVALID, 'meta contexts need structured replies first');
            break;
          }
          const req = parseMetaContext(data);
          const exp = await lookup(catalog, req.name);
          if (typeof exp === 'string') {
            refuse(OptionReply.ERR_UNKNOWN, exp);
            break;
          }
          const listing = option === Option.LIST_META_CONTEXT;
          const wanted = (listing && req.queries.length === 0) || req.queries.some(matches);
          if (wanted) reply(OptionReply.META_CONTEXT, encodeMetaContextReply(listing ? 0 : ALLOCATION_CONTEXT_ID, BASE_ALLOCATION));
          if (!listing) contextFor = wanted ? req.name : null;
          reply(OptionReply.ACK);
          break;
        }
        default:
          refuse(OptionReply.ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (err) {
      if (!(err instanceof Malformed)) throw err;
      refuse(OptionReply.ERR_INVALID, err.message);
    }
  }
  throw new NbdProtocolError(peer, `client sent more than ${MAX_OPTIONS} options without choosing an export`);
}
