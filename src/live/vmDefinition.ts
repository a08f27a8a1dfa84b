/**
 * A VM backup's definition (store/vmRecord.ts) read and rewritten for its
 * disks' new places: a libvirt domain's XML with each backed-up disk's source
 * and driver type changed (and, for a copy beside the original, a new name
 * with no UUID or MAC addresses, so that libvirt makes new ones), and what it
 * takes to boot the VM (memory, CPUs, a direct kernel boot's files).
 *
 * The domain XML is rewritten as text, element by element, never parsed and
 * printed again: everything vhdvault does not change stays byte for byte as
 * libvirt wrote it.
 */
import type { VmDefinition } from '../store/vmRecord.js';
import { VaultError } from '../util/errors.js';
import { attribute, escapeXml, text } from './libvirtXml.js';

/** What a restored disk became: its file and its format as QEMU names it (qcow2, raw, vpc). */
export interface PlacedDisk {
  path: string;
  driver: 'qcow2' | 'raw' | 'vpc';
}

/** How to start the VM again, as far as its definition says. */
export interface BootPlan {
  memoryMiB: number;
  cpus: number;
  machine: string | null;
  /** Direct kernel boot; null: firmware boots the first disk. */
  kernel: { kernel: string; initrd: string | null; append: string | null } | null;
  /** The disks' targets, in the order the VM had them. */
  targets: string[];
}

const DEFAULT_MEMORY_MIB = 512;

/** The text of the first `<name>…</name>` inside `xml`, decoded and trimmed, or null. */
const elementText = (xml: string, name: string): string | null => text(xml, name)?.trim() ?? null;

/** The domain's own children: what lies inside `<domain …>`, outside `<devices>` (where a disk's `<name>` or `<uuid>` never is). */
function domainHead(xml: string): { start: number; end: number } {
  const open = /<domain[\s>]/.exec(xml);
  if (!open) throw new VaultError('the VM backup\'s definition', 'is not a libvirt domain XML (no <domain> element)');
  const devices = xml.indexOf('<devices', open.index);
  return { start: open.index, end: devices === -1 ? xml.length : devices };
}

/** The disk elements of a domain: each `<disk …>…</disk>` with its target. */
function diskElements(xml: string): Array<{ start: number; end: number; text: string; target: string | null; device: string }> {
  const out = [];
  const re = /<disk\s[^>]*>[\s\S]*?<\/disk>/g;
  for (let m = re.exec(xml); m; m = re.exec(xml)) {
    const target = /<target\s[^>]*>/.exec(m[0]);
    const open = /^<disk\s[^>]*>/.exec(m[0])![0];
    out.push({ start: m.index, end: m.index + m[0].length, text: m[0], target: target ? attribute(target[0], 'dev') : null, device: attribute(open, 'device') ?? 'disk' });
  }
  return out;
}

/** One disk element with its source now `placed`: a file disk, its driver type set, its backing chain (if any) gone. */
function rewriteDisk(disk: string, placed: PlacedDisk): string {
  const file = escapeXml(placed.path);
  let out = disk.replace(/^<disk\s[^>]*>/, (open) => (/\stype\s*=/.test(open) ? open.replace(/\stype\s*=\s*(?:'[^']*'|"[^"]*")/, " type='file'") : open.replace('<disk', "<disk type='file'")));
  // The restored image stands alone: no backing store, and no source of another kind (block, volume, network).
  out = out.replace(/\s*<backingStore\s*\/>/g, '').replace(/\s*<backingStore[\s>][\s\S]*?<\/backingStore>/g, '');
  const source = /<source(?:\s[^>]*)?(?:\/>|>[\s\S]*?<\/source>)/.exec(out);
  const newSource = `<source file='${file}'/>`;
  if (source) out = out.slice(0, source.index) + newSource + out.slice(source.index + source[0].length);
  else out = out.replace(/(<target\s)/, `${newSource}\n      $1`);
  const driver = /<driver\s[^>]*?\/?>/.exec(out);
  if (driver) {
    const tag = /\stype\s*=/.test(driver[0]) ? driver[0].replace(/\stype\s*=\s*(?:'[^']*'|"[^"]*")/, ` type='${placed.driver}'`) : driver[0].replace('<driver', `<driver type='${placed.driver}'`);
    out = out.slice(0, driver.index) + tag + out.slice(driver.index + driver[0].length);
  } else {
    out = out.replace(newSource, `<driver name='qemu' type='${placed.driver}'/>\n      ${newSource}`);
  }
  return out;
}

/**
 * The domain XML with each backed-up disk (by target) pointing at its restored
 * file. With `rename`: the domain called so, without its `<uuid>` and with no
 * `<mac address>` anywhere, so that libvirt gives the copy new ones and it
 * never clashes with the original.
 */
export function rewriteDomainXml(xml: string, disks: Record<string, PlacedDisk>, rename?: string): string {
  const elements = diskElements(xml);
  for (const target of Object.keys(disks)) {
    if (!elements.some((e) => e.target === target)) throw new VaultError('the VM backup\'s definition', `has no <disk> with target "${target}"`);
  }
  let out = '';
  let at = 0;
  for (const e of elements) {
    const placed = e.target === null ? undefined : disks[e.target];
    if (!placed) continue;
    out += xml.slice(at, e.start) + rewriteDisk(e.text, placed);
    at = e.end;
  }
  out += xml.slice(at);
  if (rename === undefined) return out;
  const head = domainHead(out);
  let top = out.slice(head.start, head.end);
  if (!/<name>[^<]*<\/name>/.test(top)) throw new VaultError('the VM backup\'s definition', 'has no <name> element');
  top = top.replace(/<name>[^<]*<\/name>/, `<name>${escapeXml(rename)}</name>`).replace(/\s*<uuid>[^<]*<\/uuid>/, '');
  out = out.slice(0, head.start) + top + out.slice(head.end);
  return out.replace(/\s*<mac\s+address\s*=\s*(?:'[^']*'|"[^"]*")\s*\/>/g, '');
}

/** memory and currentMemory values in libvirt's units, as MiB. */
function toMiB(value: string, unit: string | null): number {
  const n = Number(value);
  const scale: Record<string, number> = { b: 1 / 1048576, bytes: 1 / 1048576, k: 1 / 1024, kib: 1 / 1024, kb: 1000 / 1048576, m: 1, mib: 1, mb: 1e6 / 1048576, g: 1024, gib: 1024, gb: 1e9 / 1048576, t: 1048576, tib: 1048576 };
  return Math.max(1, Math.round(n * (scale[(unit ?? 'KiB').toLowerCase()] ?? 1 / 1024)));
}

/** What the definition says about booting the VM. `targets`: the disks the VM backup holds. */
export function bootPlan(definition: VmDefinition, targets: string[]): BootPlan {
  if (definition.kind === 'qemu') {
    const order = definition.disks.map((d) => d.target).filter((t) => targets.includes(t));
    return {
      memoryMiB: definition.memoryMiB ?? DEFAULT_MEMORY_MIB,
      cpus: definition.cpus ?? 1,
      machine: definition.machine,
      kernel: definition.kernel ? { kernel: definition.kernel, initrd: definition.initrd, append: definition.append } : null,
      targets: [...order, ...targets.filter((t) => !order.includes(t))],
    };
  }
  const xml = definition.xml;
  const head = xml.slice(domainHead(xml).start, domainHead(xml).end);
  const memory = /<memory(\s[^>]*)?>([^<]*)<\/memory>/.exec(head);
  const vcpu = elementText(head, 'vcpu');
  const os = /<os(?:\s[^>]*)?>[\s\S]*?<\/os>/.exec(head)?.[0] ?? '';
  const kernel = elementText(os, 'kernel');
  const type = /<type(\s[^>]*)?>/.exec(os);
  const order = diskElements(xml)
    .map((e) => e.target)
    .filter((t): t is string => t !== null && targets.includes(t));
  return {
    memoryMiB: memory ? toMiB(memory[2]!.trim(), attribute(memory[1] ?? '', 'unit')) : DEFAULT_MEMORY_MIB,
    cpus: vcpu && /^\d+$/.test(vcpu) ? Number(vcpu) : 1,
    machine: type ? attribute(type[0], 'machine') : null,
    kernel: kernel ? { kernel, initrd: elementText(os, 'initrd'), append: elementText(os, 'cmdline') } : null,
    targets: [...order, ...targets.filter((t) => !order.includes(t))],
  };
}

/** A word for a POSIX shell: as is when it is safe, else in single quotes. */
export function shellWord(word: string): string {
  // Each ' closes the quotes, adds a quoted quote, and opens them again.
  const QUOTE = "'";
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : QUOTE + word.split(QUOTE).join(`${QUOTE}\\${QUOTE}${QUOTE}`) + QUOTE;
}

/**
 * The qemu-system-x86_64 command line that boots the restored disks (a script
 * body): the definition's machine, memory, CPUs and kernel, each disk a
 * virtio-blk device with its target as id and serial, the guest agent's port
 * on a socket beside the script, the serial console on the terminal.
 */
export function qemuScript(plan: BootPlan, disks: Record<string, PlacedDisk>, agentSocket: string | null): string {
  const args: string[][] = [['qemu-system-x86_64']];
  args.push(['-machine', `${plan.machine ?? 'q35'},accel=kvm:tcg`], ['-m', String(plan.memoryMiB)], ['-smp', String(plan.cpus)]);
  args.push(['-nodefaults', '-nographic', '-serial', 'mon:stdio']);
  if (plan.kernel) {
    args.push(['-kernel', plan.kernel.kernel]);
    if (plan.kernel.initrd) args.push(['-initrd', plan.kernel.initrd]);
    if (plan.kernel.append) args.push(['-append', plan.kernel.append]);
  }
  plan.targets.forEach((target, i) => {
    const d = disks[target]!;
    args.push(['-blockdev', `driver=file,node-name=file-${target},filename=${d.path.replace(/,/g, ',,')}`]);
    args.push(['-blockdev', `driver=${d.driver},node-name=${target},file=file-${target}`]);
    args.push(['-device', `virtio-blk-pci,drive=${target},id=${target},serial=${target}${plan.kernel === null && i === 0 ? ',bootindex=1' : ''}`]);
  });
  if (agentSocket !== null) {
    args.push(['-chardev', `socket,path=${agentSocket.replace(/,/g, ',,')},server=on,wait=off,id=qga0`]);
    args.push(['-device', 'virtio-serial-pci,id=vser0'], ['-device', 'virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0']);
  }
  args.push(['-nic', 'none']);
  const lines = args.map((a) => a.map(shellWord).join(' '));
  return `#!/bin/sh\n# Boots the VM restored by vhdvault vm restore (no network: add a -nic for one).\nexec ${lines.join(' \\\n  ')} "$@"\n`;
}
