import { Command } from 'commander';
import { daemonCommand } from './daemonCommand.js';
import { jobCommand } from './jobCommands.js';
import { replicateCommand } from './replicateCommand.js';
import { reportError } from './run.js';
import { serveCommand } from './serveCommand.js';
import { storeCommands } from './storeCommands.js';
import { vhdCommand } from './vhdCommands.js';

export function buildProgram(): Command {
  const program = new Command('vhdvault')
    .description('delta-backup store for virtual disks as VHD chains')
    .version('0.1.0')
    .exitOverride()
    .showHelpAfterError('(run with --help for usage)');
  for (const command of storeCommands()) program.addCommand(command);
  program.addCommand(serveCommand());
  program.addCommand(vhdCommand());
  program.addCommand(replicateCommand());
  program.addCommand(jobCommand());
  program.addCommand(daemonCommand());
  // Subcommands inherit exitOverride only when set on each.
  const override = (cmd: Command): void => {
    cmd.exitOverride();
    cmd.commands.forEach(override);
  };
  override(program);
  return program;
}

/** Run the CLI; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (err) {
    return reportError(err);
  }
}
