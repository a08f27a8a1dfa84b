import { Command } from 'commander';
import { newPasswordSources, readNewPassword } from '../crypto/password.js';
import { Repository } from '../store/repository.js';
import { addRepositoryKey, changeRepositoryPassword, listRepositoryKeys, removeRepositoryKey } from '../store/repositoryKeys.js';
import { columns } from '../util/words.js';
import { JSON_FORMATS, printJson } from './json.js';

const NEW_PASSWORD_HELP = 'the new password, in a file (also VHDVAULT_NEW_PASSWORD, VHDVAULT_NEW_PASSWORD_COMMAND; else typed twice on the terminal)';

/** The repository, opened with its password, and the new password for it. */
async function withNewPassword(root: string, file: string | undefined): Promise<{ repo: Repository; password: string }> {
  const repo = await Repository.open(root);
  return { repo, password: await readNewPassword(repo.root, newPasswordSources(file)) };
}

/** `vhdvault key …`: the passwords of an encrypted repository (docs/design/12-encryption.md §12.3). */
export function keyCommand(): Command {
  const keyCmd = new Command('key').description("an encrypted repository's passwords: one key file each");

  keyCmd
    .command('list')
    .description('list the key files; * marks the one this password opened')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (root: string, opts: { json?: boolean }) => {
      const repo = await Repository.open(root);
      const keys = await listRepositoryKeys(repo);
      if (opts.json) {
        const rows = keys.map((k) => ({ id: k.id, created: k.created, inUse: k.inUse, kdf: { name: 'scrypt', N: k.N, r: k.r, p: k.p } }));
        printJson(JSON_FORMATS.keyList, { repository: repo.root, cipher: repo.config.encryption!.cipher, keys: rows });
        return;
      }
      const rows = keys.map((k) => [k.inUse ? '*' : ' ', k.id, k.created, `scrypt N=${k.N} r=${k.r} p=${k.p}`]);
      for (const line of columns([[' ', 'ID', 'CREATED', 'KDF'], ...rows])) console.log(line);
    });

  keyCmd
    .command('add')
    .description('add another password for the same repository')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .option('--new-password-file <file>', NEW_PASSWORD_HELP)
    .action(async (root: string, opts: { newPasswordFile?: string }) => {
      const { repo, password } = await withNewPassword(root, opts.newPasswordFile);
      console.log(`added key ${await addRepositoryKey(repo, password)}`);
    });

  keyCmd
    .command('remove')
    .description('remove a key file: never the last one, never the one in use')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<key-id>', 'its id (vhdvault key list)')
    .action(async (root: string, id: string) => {
      const repo = await Repository.open(root);
      await removeRepositoryKey(repo, id);
      console.log(`removed key ${id}`);
    });

  keyCmd
    .command('passwd')
    .description('change the password of the key in use (a new key file replaces it)')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .option('--new-password-file <file>', NEW_PASSWORD_HELP)
    .action(async (root: string, opts: { newPasswordFile?: string }) => {
      const { repo, password } = await withNewPassword(root, opts.newPasswordFile);
      const old = repo.keyInUse;
      console.log(`password changed: key ${await changeRepositoryPassword(repo, password)} replaces ${old}`);
    });
  return keyCmd;
}
