// The web dashboard in headless Chromium (playwright-core driving the system's chromium): signs in,
// loads every page, takes the actions a person would, and checks that each is reflected; keeps a
// screenshot of each page. Run by tests/test_dashboard.py, which prepares the jobs it expects.
//
// Environment: CHROMIUM (the browser binary), DASHBOARD_URL, GATEWAY (gRPC host:port), TOKEN,
// FAILED_JOB (a job of queue default that failed), WAITING_JOB (one due in an hour), SCHEDULE (a
// schedule's name), SCREENSHOTS (a directory). Exits 0 when every check passed; else prints the
// failure and exits 1. Any error in the page's console fails the run too.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import { chromium } from 'playwright-core';

const env = process.env;
const URL_ = env.DASHBOARD_URL;
const SHOTS = env.SCREENSHOTS;
const WAIT = { timeout: 20_000 };
const PROTO_DIR = fileURLToPath(new URL('../../proto/', import.meta.url));
const consoleErrors = [];

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

function submit(kind, args) {
  const definition = protoLoader.loadSync(path.join(PROTO_DIR, 'jobgate/v1/scheduler.proto'), {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    enums: String,
    oneofs: true,
  });
  const Service = grpc.loadPackageDefinition(definition).jobgate.v1.SchedulerService;
  const client = new Service(env.GATEWAY, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${env.TOKEN}`);
  const fields = Object.fromEntries(Object.entries(args).map(([k, v]) => [k, { numberValue: v }]));
  return new Promise((resolve, reject) => {
    client.SubmitJob(
      { kind, args: { structValue: { fields } } },
      metadata,
      { deadline: Date.now() + 10_000 },
      (err, reply) => {
        client.close();
        if (err) reject(err);
        else resolve(reply.job.id);
      },
    );
  });
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function textOf(page, selector) {
  return (await page.locator(selector).first().textContent({ timeout: WAIT.timeout })).trim();
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env.CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
    timeout: 60_000,
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1360, height: 900 }, colorScheme: 'light' });
    page.on('console', (m) => m.type() === 'error' && !/status of 40[0-9]/.test(m.text()) && consoleErrors.push(m.text()));
    page.on('pageerror', (e) => consoleErrors.push(String(e)));

    // sign in: a wrong token is refused, the right one lets in
    await page.goto(URL_);
    await page.locator('#token').fill('not-the-token-0123456789');
    await page.locator('form.signin button').click();
    // the refusal re-renders the form: type the right token only then, or a late refusal signs out again
    await page.waitForSelector('form.signin p.muted:has-text("authorization: Bearer")', WAIT);
    await page.locator('#token').fill(env.TOKEN);
    await page.locator('form.signin button').click();

    // queues: counts, live updates, the chart, pause and resume
    await page.waitForSelector('article.queue[data-queue="default"]', WAIT);
    await page.waitForSelector('article.queue[data-queue="reports"]', WAIT);
    check((await textOf(page, 'article.queue[data-queue="default"] .stat-failed .value')) === '1', 'one failed job in default');
    await page.waitForSelector('#live.on', WAIT);
    const live = await submit('echo', { live: 1 });
    await page.waitForSelector(`#feed tr[data-job="${live}"] .state-succeeded`, WAIT); // pushed, not reloaded
    for (let i = 0; i < 40; i += 1) await submit('sleep', { seconds: 0.4 }); // work for the live chart
    await page.waitForTimeout(7000); // a few overview samples while it runs
    await shot(page, 'overview');
    await page.locator('article.queue[data-queue="reports"] button.pause').click();
    await page.waitForSelector('article.queue[data-queue="reports"] .badge.paused', WAIT);
    await page.locator('article.queue[data-queue="reports"] button.resume').click();
    await page.waitForSelector('article.queue[data-queue="reports"] button.pause', WAIT);

    // workers
    await page.locator('header nav a[data-nav="workers"]').click();
    await page.waitForSelector('#workers tr[data-worker]', WAIT);
    check((await page.locator('#workers tbody tr').count()) === 1, 'one worker listed');
    check((await textOf(page, '#workers tbody tr')).includes('/ 4'), 'its four slots');
    await shot(page, 'workers');

    // jobs: by state, paging, a job's detail, retry
    await page.goto(`${URL_}/#/jobs?queue=default&tab=succeeded`);
    await page.waitForSelector('#jobs tbody tr', WAIT);
    const first = await page.locator('#jobs tbody tr').first().getAttribute('data-job');
    await page.locator('#older').click();
    await page.waitForFunction((id) => {
      const row = document.querySelector('#jobs tbody tr');
      return row && row.dataset.job !== id;
    }, first, WAIT);
    await page.locator('#newer').click();
    await page.waitForFunction((id) => document.querySelector('#jobs tbody tr')?.dataset.job === id, first, WAIT);

    await page.goto(`${URL_}/#/jobs?queue=default&tab=failed`);
    await page.waitForSelector(`#jobs tr[data-job="${env.FAILED_JOB}"]`, WAIT);
    check((await page.locator('#jobs tbody tr').count()) === 1, 'only the failed job under Failed');
    await shot(page, 'jobs-failed');
    await page.locator(`#jobs tr[data-job="${env.FAILED_JOB}"] td.why`).click();
    await page.waitForSelector('#job-id', WAIT);
    check((await textOf(page, '#job-id')) === env.FAILED_JOB, 'the job page shows the job');
    check((await textOf(page, '#error')).startsWith('HANDLER_ERROR'), 'its error');
    check((await textOf(page, '#args')).includes('"why"'), 'its arguments');
    await shot(page, 'job');
    await page.locator('button.retry').click();
    await page.waitForFunction(() => document.querySelectorAll('#attempts tbody tr').length === 2, null, WAIT);
    await page.waitForSelector('#job-state .state-failed', WAIT); // it ran again, and failed again

    // search by id; cancel a waiting job; an unknown id
    await page.locator('#search-id').fill(env.WAITING_JOB);
    await page.locator('#search-id').press('Enter');
    await page.waitForSelector('#job-state .state-scheduled', WAIT);
    await page.locator('button.cancel').click();
    await page.waitForSelector('#job-state .state-cancelled', WAIT);
    await page.locator('#search-id').fill('0'.repeat(32));
    await page.locator('#search-id').press('Enter');
    await page.waitForSelector('#not-found', WAIT);

    // schedules: run now, pause
    await page.locator('header nav a[data-nav="schedules"]').click();
    const row = `#schedules tr[data-schedule="${env.SCHEDULE}"]`;
    await page.waitForSelector(row, WAIT);
    await page.locator(`${row} button.trigger`).click();
    await page.waitForSelector(`${row} .runs .badge`, WAIT);
    check((await textOf(page, `${row} .runs .badge`)) === 'manual', 'the manual run is listed');
    await shot(page, 'schedules');
    await page.locator(`${row} button.pause`).click();
    await page.waitForSelector(`${row} .status .badge.paused`, WAIT);

    check(consoleErrors.length === 0, `no errors in the page's console: ${consoleErrors.join(' | ')}`);
    console.log(JSON.stringify({ ok: true }));
  } catch (err) {
    // what the page showed when it went wrong: a screenshot and its text
    const [page] = browser.contexts().flatMap((c) => c.pages());
    if (page) {
      await shot(page, 'failure').catch(() => {});
      const text = await page.locator('main').innerText({ timeout: 2000 }).catch(() => '');
      process.stderr.write(`page ${page.url()}:\n${text}\nconsole: ${consoleErrors.join(' | ')}\n`);
    }
    throw err;
  } finally {
    await browser.close(); // playwright made the profile in a fresh directory and removes it
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`dashboard: ${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
