// What Piscina loads. Piscina require()s its worker file first, and Node 20.19+ can
// require() an ES module; that path aborted whole processes in CI (a failed assertion in
// CreateRequiredModuleFacade; later, with a top-level await meant to avoid it,
// "v8::Module::IsGraphAsync must be used on an instantiated module"). This entry is
// CommonJS, required plainly, and loads the ES module with import(), which never takes
// that path.
import type { BlockTask, WriteTask } from '../src/store/blockTask.js' with { 'resolution-mode': 'import' };

type Entries = typeof import('./blockWorker.js', { with: { 'resolution-mode': 'import' } });
let entries: Promise<Entries> | undefined;
const load = (): Promise<Entries> => (entries ??= import('./blockWorker.js'));

export default async function blockWorker(task: BlockTask): Promise<unknown> {
  return (await load()).default(task);
}

export async function writeBlock(task: WriteTask): Promise<number> {
  return (await load()).writeBlock(task);
}
