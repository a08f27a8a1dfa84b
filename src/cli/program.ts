import { Command, Option } from 'commander';
import { UsageError } from '../util/errors.js';
import { daemonCommand } from './daemonCommand.js';
import { uiCommand } from './dashboardCommand.js';
import { jobCommand } from './jobCommands.js';
import { keyCommand } from './keyCommands.js';
import { PASSWORD_FILE_ENV, TARGET_PASSWORD_FILE_ENV } from '../crypto/password.js';
import { replicateCommand } from './replicateCommand.js';
import { wantsJson } from './json.js';
import { reportError } from './run.js';
import { serveCommand } from './serveCommand.js';
import { storeCommands } from './storeCommands.js';
import { vhdCommand } from './vhdCommands.js';
import { vmCommand } from './vmCommands.js';

export function buildProgram(): Command {
  const program = new Command('vhdvault')
    .description('delta-backup store for virtual disks as VHD chains')
    .version('0.1.0')
    .exitOverride()
    .showHelpAfterError('(run with --help for usage)');
  for (const command of storeCommands()) program.addCommand(command);
  program.addCommand(serveCommand());
  program.addCommand(vhdCommand());
  program.addCommand(vmCommand());
  program.addCommand(replicateCommand());
  program.addCommand(jobCommand());
  program.addCommand(daemonCommand());
  program.addCommand(uiCommand());
  program.addCommand(keyCommand());
  for (const cmd of program.commands) addEndpointOption(cmd);
  for (const cmd of program.commands) addPasswordOption(cmd);
  // Subcommands inherit exitOverride only when set on each.
  const override = (cmd: Command): void => {
    cmd.exitOverride();
    cmd.commands.forEach(override);
  };
  override(program);
  return program;
}

/** Commands that open a repository (directly, or through a job file or a daemon): they take --endpoint. */
// Not replicate: it refuses object stores (its own line says so), so an S3 endpoint would only mislead.
const TAKES_REPOSITORY = new Set(['init', 'backup', 'list', 'restore', 'verify', 'prune', 'unlock', 'serve', 'run', 'check', 'history', 'daemon', 'ui', 'convert', 'add', 'remove', 'passwd']);

/**
 * `--endpoint <url>` on every command that opens a repository: the S3 endpoint
 * for s3:// repositories, over AWS_ENDPOINT_URL(_S3). It is set as
 * AWS_ENDPOINT_URL_S3 for this run, so the backups a job run starts use it too.
 */
function addEndpointOption(cmd: Command): void {
  cmd.commands.forEach(addEndpointOption);
  if (!TAKES_REPOSITORY.has(cmd.name()) || cmd.commands.length > 0) return;
  cmd.addOption(new Option('--endpoint <url>', 's3:// repositories: the S3 endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)'));
  cmd.hook('preAction', (_cmd, action) => {
    const endpoint = action.opts<{ endpoint?: string }>().endpoint;
    if (endpoint === undefined) return;
    if (!/^https?:\/\/[^/\s]+/.test(endpoint)) throw new UsageError(`--endpoint ${endpoint}: give a URL such as http://127.0.0.1:9000 or https://s3.example.com`);
    process.env.AWS_ENDPOINT_URL_S3 = endpoint;
  });
}

/** Commands that may open an encrypted repository: they take --password-file (init's is the new repository's). */
const TAKES_PASSWORD = new Set([...TAKES_REPOSITORY, 'replicate', 'boot-check']);

/**
 * `--password-file <file>` on every command that opens a repository. Set as
 * VHDVAULT_PASSWORD_FILE for this run, as --endpoint is, so that what a job
 * run or a daemon opens reads it too; VHDVAULT_PASSWORD still comes first.
 */
function addPasswordOption(cmd: Command): void {
  cmd.commands.forEach(addPasswordOption);
  if (!TAKES_PASSWORD.has(cmd.name()) || cmd.commands.length > 0) return;
  cmd.addOption(new Option('--password-file <file>', "encrypted repositories: the password, in a file's first line (after VHDVAULT_PASSWORD; before VHDVAULT_PASSWORD_COMMAND and the prompt)"));
  cmd.hook('preAction', (_cmd, action) => {
    const { passwordFile, targetPasswordFile } = action.opts<{ passwordFile?: string; targetPasswordFile?: string }>();
    if (passwordFile !== undefined) process.env[PASSWORD_FILE_ENV] = passwordFile;
    if (targetPasswordFile !== undefined) process.env[TARGET_PASSWORD_FILE_ENV] = targetPasswordFile;
  });
}

/** Run the CLI; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (err) {
    return reportError(err, wantsJson(argv.slice(2)));
  }
}
