/**
 * The dashboard in a real browser: Debian's chromium, headless, driven by
 * puppeteer-core (no browser download). Each page is loaded against a
 * repository real job runs filled, and what a person sees is asserted: ages,
 * states, a failure's reason, stage bars, the trend plots' points, the chain,
 * "run now" turning a row to running and back without a reload, and the
 * token form. Each page's screenshot is taken; with
 * VHDVAULT_DOC_SCREENSHOTS=1 they are written to docs/images/ for the docs.
 */
import { existsSync } from 'node:fs';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';
import { daemonDashboard, killUis, startUi } from './helpers/dashboard.js';
import { Daemon, killDaemons } from './helpers/daemon.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { initRepo } from './helpers/store.js';

const CHROMIUM = '/usr/bin/chromium';
const hasChromium = existsSync(CHROMIUM);
if (!hasChromium && process.env.CI) throw new Error(`${CHROMIUM} is missing: CI must install chromium (.ci/run)`);
const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-browser-');
const repo = join(dir, 'repo');
const jobFile = join(dir, 'nightly.yaml');
const slowJob = join(dir, 'slow.yaml');
const token = 'browser-token-0123456789abcdef';
const shots = process.env.VHDVAULT_DOC_SCREENSHOTS === '1' ? fileURLToPath(new URL('../docs/images/', import.meta.url)) : join(dir, 'shots');
let browser: Browser;

beforeAll(async () => {
  if (!hasChromium) return;
  await mkdir(shots, { recursive: true });
  await initRepo(repo, 'dir');
  await makeRaw(join(dir, 'alpha.raw'), 8 * MiB, [[0, 8 * MiB]]);
  await makeRaw(join(dir, 'beta.raw'), 4 * MiB, [[0, 4 * MiB]]);
  await makeRaw(join(dir, 'big.raw'), 48 * MiB, [[0, 48 * MiB]]);
  await writeFile(join(dir, 'token'), `${token}\n`);
  await writeFile(jobFile, 'name: nightly\nschedule: "0 3 * * *"\nrepository: repo\ndisks:\n  - name: alpha\n    source: alpha.raw\n  - name: beta\n    source: beta.raw\n  - name: gamma\n    source: gamma-is-missing.raw\nverify: new\n');
  await writeFile(slowJob, 'name: slow\nschedule: "0 4 1 1 *"\nrepository: repo\nmaxRead: 8MiB\ndisks:\n  - name: big\n    source: big.raw\n');
  for (let i = 0; i < 3; i++) await vhdvaultAsync('job', 'run', jobFile);
  // Its profile, caches and settings in the test's folder, removed with it.
  const home = join(dir, 'home');
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: join(home, 'profile'),
    env: { ...process.env, HOME: home, XDG_CONFIG_HOME: join(home, 'config'), XDG_CACHE_HOME: join(home, 'cache') },
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
}, 180_000);

afterAll(async () => {
  await browser?.close();
  killDaemons();
  killUis();
});


/** A fresh page that fails the test on any script error or failed request. */
async function open(url: string): Promise<{ page: Page; problems: string[] }> {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(`script error: ${(e as Error).message}`));
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()}`));
  page.on('console', (m) => m.type() === 'error' && problems.push(`console: ${m.text()}`));
  await page.goto(url, { waitUntil: 'networkidle0' });
  return { page, problems };
}

const rowText = (page: Page, selector: string) => page.$eval(selector, (el) => (el as HTMLElement).innerText.replace(/\s+/g, ' ').trim());

/** The row's text once it matches, reading again across the page's own reloads; the last text read if it never does. */
async function rowOnceItReads(page: Page, selector: string, wanted: RegExp, withinMs = 20_000): Promise<string> {
  const deadline = Date.now() + withinMs;
  let seen = '';
  while (Date.now() < deadline) {
    seen = await rowText(page, selector).catch(() => seen); // a reload in progress: read again
    if (wanted.test(seen)) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  return seen;
}

async function shoot(page: Page, name: string): Promise<void> {
  const file = join(shots, `dashboard-${name}.png`);
  await page.screenshot({ path: file as `${string}.png`, fullPage: true });
  expect((await stat(file)).size).toBeGreaterThan(10_000);
}

describe.skipIf(!hasChromium)('the dashboard in chromium', () => {
  let base = '';
  beforeAll(async () => {
    base = await startUi(jobFile, '--http', '127.0.0.1:0');
  });

  it('overview: each disk with its state, age and size; the failed one with its reason', async () => {
    const { page, problems } = await open(`${base}/`);
    expect(await rowText(page, '#disks tr[data-disk="alpha"]')).toMatch(/^alpha nightly protected delta \d{8}T\d{9}Z-[0-9a-f]{6} \d+ s ago \d/);
    expect(await rowText(page, '#disks tr[data-disk="gamma"]')).toMatch(/^gamma nightly failed — — — failed: \S+gamma-is-missing\.raw: no such file or directory/);
    expect(await page.$eval('#disks tr[data-disk="gamma"] .pill', (el) => getComputedStyle(el).backgroundColor)).toBe('rgb(198, 40, 40)');
    // `ui` runs nothing: no Run now button (the daemon's page has one, below).
    expect(await rowText(page, '#jobs tr[data-job="nightly"]')).toMatch(/^nightly 0 3 \* \* \* \S+ failed, \d+ s, \S+ 3 \(3 failed\)$/);
    await shoot(page, 'overview');
    expect(problems).toEqual([]);
  });

  it('a run: per disk a bar of its stages, the bounding one marked', async () => {
    const { page, problems } = await open(`${base}/`);
    await Promise.all([page.waitForNavigation({ waitUntil: 'networkidle0' }), page.click('#jobs tr[data-job="nightly"] a')]);
    expect(page.url()).toMatch(/\/jobs\/nightly\/runs\/\d{8}T\d{9}Z-[0-9a-f]{6}$/);
    const bars = await page.$$eval('#run-disks tr', (rows) => rows.map((r) => ({ disk: (r as HTMLElement).dataset.disk, stages: [...r.querySelectorAll('.stage')].map((s) => s.className), width: (r.querySelector('.stages') as HTMLElement | null)?.getBoundingClientRect().width ?? 0 })));
    const alpha = bars.find((b) => b.disk === 'alpha')!;
    expect(alpha.width).toBeGreaterThan(100);
    expect(alpha.stages.filter((c) => c.includes('bounding'))).toHaveLength(1);
    expect(await rowText(page, '#run-disks tr[data-disk="gamma"]')).toMatch(/failed \S+gamma-is-missing\.raw/);
    await shoot(page, 'run');
    expect(problems).toEqual([]);
  });

  it('trends: a plot per disk with a point per successful run', async () => {
    const { page, problems } = await open(`${base}/trends`);
    const plots = await page.$$eval('section.trend', (sections) => sections.map((s) => ({ disk: (s as HTMLElement).dataset.disk, points: (s as unknown as { plot: { data: number[][] } }).plot.data[0]!.length, canvas: s.querySelector('canvas') !== null })));
    expect(plots.sort((a, b) => a.disk!.localeCompare(b.disk!))).toEqual([
      { disk: 'alpha', points: 3, canvas: true },
      { disk: 'beta', points: 3, canvas: true },
    ]);
    await shoot(page, 'trends');
    expect(problems).toEqual([]);
  });

  it('a disk: its chain, and the commands to restore or serve a backup', async () => {
    const { page, problems } = await open(`${base}/`);
    await Promise.all([page.waitForNavigation({ waitUntil: 'networkidle0' }), page.click('#disks tr[data-disk="alpha"] a')]);
    const chain = await page.$$eval('ol.chain li', (items) => items.map((li) => li.className));
    expect(chain).toEqual(['full', 'delta', 'delta']);
    await page.click('ol.chain li:last-child summary');
    const command = await page.$eval('ol.chain li:last-child pre', (el) => (el as HTMLElement).innerText);
    expect(command).toMatch(new RegExp(`^vhdvault restore ${repo} alpha alpha\\.raw --backup \\d{8}T\\d{9}Z-[0-9a-f]{6}\\nvhdvault serve ${repo} alpha --backup`));
    await shoot(page, 'disk');
    expect(problems).toEqual([]);
  });

  it('with a token, the page asks for it once and remembers it', async () => {
    const guarded = await startUi(repo, '--token-file', join(dir, 'token'), '--http', '127.0.0.1:0');
    const { page, problems } = await open(`${guarded}/`);
    expect(await page.$eval('body', (b) => (b as HTMLElement).innerText)).toContain('This dashboard needs its token');
    await page.type('input[name="token"]', token);
    await Promise.all([page.waitForNavigation({ waitUntil: 'networkidle0' }), page.click('button[type="submit"]')]);
    expect(await page.$eval('h1', (h) => h.textContent)).toBe('Overview');
    await page.goto(`${guarded}/trends`, { waitUntil: 'networkidle0' });
    expect(await page.$eval('h1', (h) => h.textContent)).toBe('Trends');
    expect(problems.filter((p) => !p.includes('401'))).toEqual([]);
  });
});

describe.skipIf(!hasChromium)('a daemon\'s dashboard in chromium', () => {
  it('"run now" turns the job and its disk to running with progress, then back, without a reload', async () => {
    const d = new Daemon(slowJob, '--http', '127.0.0.1:0');
    const base = await daemonDashboard(d);
    const { page, problems } = await open(`${base}/`);
    expect(await rowText(page, '#disks tr[data-disk="big"] td.state')).toBe('never backed up');
    await page.click('#jobs tr[data-job="slow"] button');
    await page.waitForFunction(() => document.querySelector('#disks tr[data-disk="big"] td.state')?.textContent?.includes('running'), { timeout: 15_000 });
    expect(await page.$eval('#jobs tr[data-job="slow"] button', (b) => (b as HTMLButtonElement).disabled)).toBe(true);
    await page.waitForFunction(() => document.querySelector('#disks tr[data-disk="big"] progress') !== null, { timeout: 15_000 });
    await shoot(page, 'running');
    await d.waitFor((e) => e.event === 'finished' && e.job === 'slow');
    // The page reloads itself once the run is over (the rows' other cells change too).
    expect(await rowOnceItReads(page, '#disks tr[data-disk="big"]', /^big slow protected/)).toMatch(/^big slow protected full \d{8}T\d{9}Z-[0-9a-f]{6} \d+ s ago/);
    expect(problems).toEqual([]);
    d.signal('SIGTERM');
    expect(await d.exited).toBe(0);
  }, 120_000);
});
