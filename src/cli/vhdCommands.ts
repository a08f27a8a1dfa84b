import { Command, Option } from 'commander';
import { realpath } from 'node:fs/promises';
import { extname, resolve } from 'node:path';
import { convert, type OutputFormat } from '../vhd/convert.js';
import { createDifferencingVhd, createDynamicVhd } from '../vhd/create.js';
import { describeVhd, formatDescription } from '../vhd/describe.js';
import { UsageError } from '../vhd/errors.js';
import { VhdChain } from '../vhd/VhdChain.js';
import { VhdDirectory } from '../vhd/VhdDirectory.js';
import { type Compression, COMPRESSIONS } from '../vhd/compression.js';
import { parseSize } from './sizes.js';

const FORMAT_BY_EXTENSION: Record<string, OutputFormat> = { '.vhd': 'vhd', '.raw': 'raw', '.img': 'raw', '.vhd-dir': 'dir' };

export function outputFormatFor(output: string, requested?: OutputFormat): OutputFormat {
  if (requested) return requested;
  const byExtension = FORMAT_BY_EXTENSION[extname(output).toLowerCase()];
  if (!byExtension) throw new UsageError(`cannot tell the output format from "${output}": use --format vhd|fixed|raw|dir`);
  return byExtension;
}

async function sameFile(a: string, b: string): Promise<boolean> {
  const [ra, rb] = await Promise.all([realpath(a).catch(() => resolve(a)), realpath(b).catch(() => resolve(b))]);
  return ra === rb;
}

/** Every file a conversion reads: the input and, for a VHD, its parents (a raw or unreadable input is just itself). */
async function inputFiles(input: string, fromRaw: boolean): Promise<string[]> {
  if (fromRaw) return [input];
  const chain = await VhdChain.open(input).catch(() => null);
  if (!chain) return [input];
  await chain.close();
  return chain.members.map((m) => m.path);
}

export function vhdCommand(): Command {
  const vhd = new Command('vhd').description('create, inspect, check and convert VHD files and directories');

  vhd
    .command('create')
    .description('create an empty dynamic VHD, or a differencing VHD over --parent (a name ending .vhd-dir makes a directory)')
    .argument('<out.vhd>', 'file (or .vhd-dir directory) to create')
    .option('--size <size>', 'virtual size (bytes or K/M/G/T)', parseSize)
    .option('--block-size <size>', 'block size, a power of two (default 2M)', parseSize)
    .option('--parent <parent.vhd>', 'make a differencing disk over this VHD')
    .addOption(new Option('--compression <codec>', 'codec of a directory\'s files').choices([...COMPRESSIONS]))
    .action(async (out: string, opts: { size?: number; blockSize?: number; parent?: string; compression?: Compression }) => {
      const layout = extname(out).toLowerCase() === '.vhd-dir' ? 'dir' : 'file';
      if (opts.compression && layout !== 'dir') throw new UsageError('--compression applies only to a directory (a name ending .vhd-dir)');
      const storage = { layout, compression: opts.compression } as const;
      if (opts.parent) {
        if (opts.size !== undefined) throw new UsageError('--size does not apply with --parent: a differencing disk takes its parent\'s size');
        await createDifferencingVhd(out, opts.parent, { blockSize: opts.blockSize, ...storage });
      } else {
        if (opts.size === undefined) throw new UsageError('--size is required (or --parent)');
        await createDynamicVhd(out, { size: opts.size, blockSize: opts.blockSize, ...storage });
      }
    });

  vhd
    .command('info')
    .description('describe a VHD')
    .argument('<path>')
    .option('--json', 'print one JSON object')
    .action(async (path: string, opts: { json?: boolean }) => {
      const description = await describeVhd(path);
      console.log(opts.json ? JSON.stringify(description, null, 2) : formatDescription(description));
    });

  vhd
    .command('check')
    .description('validate a VHD and its parents; exit 1 with the first problem')
    .argument('<path>')
    .action(async (path: string) => {
      const chain = await VhdChain.open(path);
      try {
        // Directories are validated block by block only when asked: here.
        for (const member of chain.members) if (member instanceof VhdDirectory) await member.verifyBlocks();
        const depth = chain.members.length;
        console.log(`${path}: ok (${chain.top.footer.diskType}, ${chain.size} bytes${depth > 1 ? `, chain of ${depth} disks` : ''})`);
      } finally {
        await chain.close();
      }
    });

  vhd
    .command('convert')
    .description('convert a VHD (read through its chain) or raw image to a full disk')
    .argument('<input>')
    .argument('<output>')
    .addOption(new Option('--format <format>', 'output format (default from the extension)').choices(['vhd', 'fixed', 'raw', 'dir']))
    .addOption(new Option('--from <format>', 'treat the input as this format').choices(['raw']))
    .addOption(new Option('--compression <codec>', 'codec of a directory output\'s files').choices([...COMPRESSIONS]))
    .action(async (input: string, output: string, opts: { format?: OutputFormat; from?: 'raw'; compression?: Compression }) => {
      const format = outputFormatFor(output, opts.format);
      if (opts.compression && format !== 'dir') throw new UsageError('--compression applies only to directory output (--format dir)');
      for (const file of await inputFiles(input, opts.from === 'raw')) {
        if (!(await sameFile(file, output))) continue;
        throw new UsageError(file === input ? 'input and output are the same file' : `output ${output} is ${file}, a parent of the input: converting would destroy the chain`);
      }
      await convert(input, output, { format, fromRaw: opts.from === 'raw', compression: opts.compression });
    });

  return vhd;
}
