/**
 * Just enough XML for what libvirt prints and reads back: its domain, backup
 * and checkpoint documents. libvirt writes them itself, regularly (attributes
 * in single quotes, its five entities), so elements and attributes are found
 * by pattern rather than with a parser vhdvault would have to depend on.
 */

/** Each `<tag …>…</tag>` or `<tag …/>` in `xml`, whole (nested tags of another name inside are kept). */
export function elements(xml: string, tag: string): string[] {
  const found: string[] = [];
  const open = new RegExp(`<${tag}(?=[\\s/>])[^>]*?(/?)>`, 'g');
  for (let m = open.exec(xml); m !== null; m = open.exec(xml)) {
    if (m[1] === '/') {
      found.push(m[0]);
      continue;
    }
    const close = xml.indexOf(`</${tag}>`, open.lastIndex);
    const end = close < 0 ? open.lastIndex : close + tag.length + 3;
    found.push(xml.slice(m.index, end));
    open.lastIndex = end;
  }
  return found;
}

/** The first `<tag>` in `xml`, or null. */
export const element = (xml: string, tag: string): string | null => elements(xml, tag)[0] ?? null;

/** An attribute of an element's opening tag, decoded, or null. */
export function attribute(el: string, name: string): string | null {
  const head = el.slice(0, el.indexOf('>') + 1);
  const m = new RegExp(`\\s${name}=(?:'([^']*)'|"([^"]*)")`).exec(head);
  return m ? decode(m[1] ?? m[2] ?? '') : null;
}

/** The text inside `<tag>…</tag>` (first one), decoded, or null. */
export function text(xml: string, tag: string): string | null {
  const m = new RegExp(`<${tag}(?:\\s[^>]*)?>([^<]*)</${tag}>`).exec(xml);
  return m ? decode(m[1]!) : null;
}

const ENTITIES: Record<string, string> = { '&lt;': '<', '&gt;': '>', '&quot;': '"', '&apos;': "'", '&amp;': '&' };

function decode(s: string): string {
  return s.replace(/&(lt|gt|quot|apos|amp|#\d+|#x[0-9a-f]+);/gi, (e) => {
    if (e[1] !== '#') return ENTITIES[e] ?? e;
    return String.fromCodePoint(e[2] === 'x' || e[2] === 'X' ? Number.parseInt(e.slice(3, -1), 16) : Number(e.slice(2, -1)));
  });
}

/** A value made safe for an attribute in single quotes or for text. */
export const escapeXml = (s: string) => s.replace(/[&<>'"]/g, (c) => `&#${c.charCodeAt(0)};`);
