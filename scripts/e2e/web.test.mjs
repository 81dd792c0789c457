// End-to-end test of the forwarder's web page in headless Chromium (Debian's /usr/bin/chromium
// driven by playwright-core). scripts/test.d/web.sh starts the forwarder and the echo backends
// and passes their addresses in the environment; this script only drives the page and sockets.
//
// It opens the page, refuses an invalid entry with the reason next to the field, adds a rule
// through the form, sends real traffic through the new port, watches its connection count rise
// on the page, closes a connection from the page, checks a hostile rule name is shown as text,
// edits a rule through the form, saves a screenshot, adds a UDP rule with the form's protocol
// choice and sees its session on the page, deletes the rules through the page (the
// port closes, an established connection stays), checks that a save over a hand edit made
// meanwhile is refused, and that the hand edit shows after a reload. On a second forwarder
// whose changes need a token, served over HTTPS (HSTS sent, no warning), the page asks for the
// token once, or takes it from a #token= link. A third forwarder, bound off loopback over plain
// HTTP, shows the banner saying the token and the rules travel unencrypted.

import { chromium } from 'playwright-core';
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import { freePort } from './ports.mjs';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run scripts/test.d/web.sh)`);
  return v;
};
const WEB_URL = env('WEB_URL');
const RULES_FILE = env('RULES_FILE');
const BACKEND_PORT = Number(env('BACKEND_PORT'));
const POOL_PORT = Number(env('POOL_PORT'));
const DEAD_POOL_PORT = Number(env('DEAD_POOL_PORT'));
const NEW_PORT = Number(env('NEW_PORT'));
const SCREENSHOT = env('SCREENSHOT');
const TOKEN_URL = env('TOKEN_URL');
const TOKEN_RULES_FILE = env('TOKEN_RULES_FILE');
const WEB_TOKEN = env('WEB_TOKEN');
const TOKEN_SPKI = env('TOKEN_SPKI');
const PLAIN_URL = env('PLAIN_URL');
const WAIT_MS = 15_000;
const TRAFFIC_S = Number(process.env.WEB_E2E_TRAFFIC_S || 8);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let step = 'start';
const log = (msg) => console.error(`web e2e: ${msg}`);
const begin = (name) => {
  step = name;
  log(name);
};

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

/** Polls `fn` until it returns a truthy value or the time is up. */
async function until(what, fn, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await sleep(100);
  }
}

/** A client connection with a queue of received bytes. */
function connect(port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    const client = { socket, received: Buffer.alloc(0), closed: false };
    socket.on('data', (d) => {
      client.received = Buffer.concat([client.received, d]);
    });
    socket.on('close', () => {
      client.closed = true;
    });
    socket.once('connect', () => {
      socket.removeListener('error', reject);
      socket.on('error', () => {});
      resolve(client);
    });
    socket.once('error', reject);
  });
}

/** Sends `text` and waits for exactly the same bytes back (the backends echo). */
async function echo(client, text) {
  const before = client.received.length;
  client.socket.write(text);
  await until(`echo of ${JSON.stringify(text)}`, () => client.received.length >= before + Buffer.byteLength(text));
  const got = client.received.subarray(before, before + Buffer.byteLength(text)).toString();
  assert(got === text, `echoed ${JSON.stringify(got)}, sent ${JSON.stringify(text)}`);
}

/** Resolves to the connect error code, or 'connected'. */
function tryConnect(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve('connected');
    });
    s.once('error', (e) => resolve(e.code));
  });
}

async function rowText(page, name, cls) {
  const cell = page.locator(`tr.entry[data-name="${name}"] td.${cls}`);
  return (await cell.count()) ? (await cell.innerText()).trim() : null;
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'forwarder-e2e-profile-'));
const clients = [];
const streams = [];
let context;
let page;
const pageErrors = [];
const dialogs = [];

try {
  begin('launching chromium');
  context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1440, height: 900 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      // Trust the HTTPS forwarder's throwaway key, and only that key.
      `--ignore-certificate-errors-spki-list=${TOKEN_SPKI}`,
    ],
  });
  page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    // The browser logs every 4xx answer; the refused entry is one on purpose.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(m.text());
  });
  page.on('dialog', async (d) => {
    dialogs.push(d.message());
    await d.dismiss();
  });

  begin('opening the page');
  await page.goto(WEB_URL);
  await page.locator('tr.entry[data-name="echo-a"]').waitFor({ timeout: WAIT_MS });
  await until('the live indicator', async () => (await page.locator('#live-text').innerText()) === 'live');
  assert(await page.locator('#transport-banner').isHidden(), 'no plain-HTTP warning on loopback');

  begin('traffic through the existing pool (round robin over two backends)');
  for (let i = 0; i < 6; i += 1) {
    const c = await connect(POOL_PORT);
    await echo(c, `pool ${i}\n`);
    clients.push(c);
  }
  // Two attempts at the pool whose backend is down: the forwarder closes them (unrouted).
  for (let i = 0; i < 2; i += 1) {
    const c = await connect(DEAD_POOL_PORT).catch(() => null);
    if (c) await until('the dead pool to close the connection', () => c.closed);
  }
  await until('the down backend on the page', async () => (await rowText(page, 'legacy-db', 'health'))?.startsWith('DOWN'));
  const reason = await rowText(page, 'legacy-db', 'health');
  assert(/refused/i.test(reason), `the down backend shows its reason, got ${JSON.stringify(reason)}`);
  await until('pool shares of 50% each', async () => {
    const a = await page.locator('tr.entry[data-name="echo-a"] .share-text').innerText();
    const b = await page.locator('tr.entry[data-name="echo-b"] .share-text').innerText();
    return a === '50%' && b === '50%';
  });

  begin('invalid entry: refused with the reason next to the field');
  await page.getByRole('button', { name: '+ Add entry' }).click();
  await page.getByLabel('Name').fill('new-web');
  await page.getByLabel('Listening port').fill('99999');
  await page.getByLabel('Destination IP or host').fill('127.0.0.1');
  await page.getByLabel('Destination port').fill(String(BACKEND_PORT));
  await page.getByRole('button', { name: 'Save' }).click();
  const fieldError = page.locator('.field-error[data-for="listen_port"]');
  await until('the listen_port error', async () => (await fieldError.innerText()).includes('out of range'));
  assert(
    (await fieldError.innerText()) === 'port 99999 is out of range 1-65535',
    `field error text: ${await fieldError.innerText()}`,
  );
  assert((await page.locator('.field-error[data-for="name"]').innerText()) === '', 'no error on the name');
  assert(!fs.readFileSync(RULES_FILE, 'utf8').includes('new-web'), 'an invalid entry must not reach the file');

  begin('a bad option: refused with the reason next to the Options field');
  await page.getByLabel('Listening port').fill(String(NEW_PORT));
  await page.getByLabel('Options (optional)').fill('allow=127.0.0.0/33');
  await page.getByRole('button', { name: 'Save' }).click();
  const optionsError = page.locator('.field-error[data-for="options"]');
  await until('the options error', async () => (await optionsError.innerText()) !== '');
  assert(
    (await optionsError.innerText()) === 'allow: "127.0.0.0/33" is not an address or CIDR',
    `options error text: ${await optionsError.innerText()}`,
  );
  assert(!fs.readFileSync(RULES_FILE, 'utf8').includes('new-web'), 'a bad option must not reach the file');

  begin('adding the rule through the form');
  await page.getByLabel('Options (optional)').fill('allow=127.0.0.0/8 max_conns=100');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.locator('tr.entry[data-name="new-web"]').waitFor({ timeout: WAIT_MS });
  assert(!(await page.locator('#entry-dialog').evaluate((d) => d.open)), 'the dialog closes after saving');
  assert(
    fs.readFileSync(RULES_FILE, 'utf8').split('\n').some((l) => l.startsWith(`new-web,${NEW_PORT},127.0.0.1,${BACKEND_PORT},`)
      && l.includes('allow=127.0.0.0/8 max_conns=100')),
    'the rules file holds the new rule with its options',
  );
  assert(
    (await page.locator('tr.entry[data-name="new-web"] .options').innerText()) === 'allow=127.0.0.0/8 max_conns=100',
    'the table shows the options',
  );
  assert(fs.existsSync(`${RULES_FILE}.bak`), 'the previous rules file is kept as .bak');

  begin('the new port forwards real traffic');
  const fresh = [];
  for (let i = 0; i < 3; i += 1) {
    const c = await until(`a connection to the new port ${NEW_PORT}`, () => connect(NEW_PORT).catch(() => null), 5000);
    await echo(c, `hello through the new rule ${i}\n`);
    fresh.push(c);
    clients.push(c);
  }

  begin('watching its connection count rise on the page');
  await until('3 active connections on the new rule', async () => (await rowText(page, 'new-web', 'active')) === '3');
  await until('3 rows in the connection table', async () => (await page.locator('#conns-body tr[data-rule="new-web"]').count()) === 3);
  assert((await rowText(page, 'new-web', 'total')) === '3', 'total connections of the new rule');

  begin('closing one connection from the page');
  await page.locator('#conns-body tr[data-rule="new-web"]').first().getByRole('button', { name: 'Close' }).click();
  await until('a client to see its connection closed', () => fresh.some((c) => c.closed));
  await until('2 active connections on the new rule', async () => (await rowText(page, 'new-web', 'active')) === '2');

  begin(`throughput for the charts (${TRAFFIC_S} s)`);
  // Varying load: every open client sends a chunk whose size swings over time, and short
  // connections come and go on the pool, so the charts and rates have something to show.
  const t0 = Date.now();
  for (const c of clients.filter((x) => !x.closed)) {
    streams.push(setInterval(() => {
      const swing = 1 + 0.8 * Math.sin((Date.now() - t0) / 4000);
      c.socket.write(Buffer.alloc(Math.round(24 * 1024 * swing), 120));
    }, 200));
  }
  const shortLived = [];
  streams.push(setInterval(() => {
    connect(POOL_PORT).then((c) => {
      shortLived.push(c);
      c.socket.write('short\n');
      setTimeout(() => c.socket.end(), 1500 + Math.random() * 2500);
    }).catch(() => {});
  }, 400));
  await sleep(TRAFFIC_S * 1000);
  for (const s of streams.splice(0)) clearInterval(s);
  await until('received bytes on the page', async () => (await rowText(page, 'new-web', 'bytes-down')) !== '0 B');

  begin(`screenshot to ${SCREENSHOT}`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: SCREENSHOT, fullPage: true });

  begin('a hostile rule name is shown as text');
  const XSS_PORT = await freePort();
  const hostile = '<img src=x onerror="window.__xss=1">';
  const status = await page.evaluate(async ([name, port, dest]) => {
    const rules = await fetch('/api/rules');
    const res = await fetch('/api/rules', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'If-Match': rules.headers.get('ETag') },
      body: JSON.stringify({ name, listen_port: String(port), dest_ip: '127.0.0.1', dest_port: String(dest) }),
    });
    return res.status;
  }, [hostile, XSS_PORT, BACKEND_PORT]);
  assert(status === 201, `adding the hostile name from the page's origin: HTTP ${status}`);
  const hostileRow = page.locator('tr.entry').filter({ hasText: 'onerror' });
  await hostileRow.waitFor({ timeout: WAIT_MS });
  const shown = await hostileRow.locator('td.name').evaluate((td) => td.firstChild.textContent);
  assert(shown === hostile, `the name is shown verbatim, got ${JSON.stringify(shown)}`);
  assert((await page.locator('#rules-table img').count()) === 0, 'no element was created from the name');
  assert((await page.evaluate(() => window.__xss)) === undefined, 'no script ran from the name');

  begin('editing a rule through the form');
  await hostileRow.getByRole('button', { name: 'Edit' }).click();
  assert((await page.locator('#entry-title').textContent()) === `Edit “${hostile}”`, 'the dialog names the rule as text');
  assert((await page.getByLabel('Listening port').inputValue()) === String(XSS_PORT), 'the form holds the rule');
  await page.getByLabel('Name').fill('was-hostile');
  await page.getByRole('button', { name: 'Save' }).click();
  const renamed = page.locator('tr.entry[data-name="was-hostile"]');
  await renamed.waitFor({ timeout: WAIT_MS });
  assert((await hostileRow.count()) === 0, 'the old name is gone');
  assert(fs.readFileSync(RULES_FILE, 'utf8').includes(`was-hostile,${XSS_PORT},`), 'the edit reached the file');

  begin('deleting the new rules through the page');
  const keep = fresh.find((c) => !c.closed);
  await page.locator('tr.entry[data-name="new-web"] input[type="checkbox"]').check();
  await renamed.locator('td.name').click();
  await page.getByRole('button', { name: 'Delete selected (2)' }).click();
  await page.locator('#confirm-dialog').getByRole('button', { name: 'Delete' }).click();
  await until('the rows to disappear', async () => (await page.locator('tr.entry[data-name="new-web"]').count()) === 0 && (await renamed.count()) === 0);
  assert(!fs.readFileSync(RULES_FILE, 'utf8').includes('new-web'), 'the rules file no longer holds the rule');

  begin('the deleted port is closed; the established connection stays');
  await until(`port ${NEW_PORT} to refuse connections`, async () => (await tryConnect(NEW_PORT)) === 'ECONNREFUSED', 5000);
  assert((await tryConnect(XSS_PORT)) === 'ECONNREFUSED', 'the edited rule\'s port is closed too');
  await echo(keep, 'still here after the delete\n');
  assert((await tryConnect(POOL_PORT)) === 'connected', 'the other rules keep listening');

  begin('a save over a hand edit made meanwhile is refused (412), not silently merged');
  const HAND_PORT = await freePort();
  await page.getByRole('button', { name: '+ Add entry' }).click();
  fs.appendFileSync(RULES_FILE, `hand-edit,${HAND_PORT},127.0.0.1,${BACKEND_PORT}\n`);
  await until('the forwarder to pick up the hand edit', async () => (await tryConnect(HAND_PORT)) === 'connected', 10_000);
  await page.getByLabel('Name').fill('late');
  await page.getByLabel('Listening port').fill(String(NEW_PORT));
  await page.getByLabel('Destination IP or host').fill('127.0.0.1');
  await page.getByLabel('Destination port').fill(String(BACKEND_PORT));
  await page.getByRole('button', { name: 'Save' }).click();
  await until('the stale-write message', async () => (await page.locator('#form-error').innerText()).includes('the rules changed since you loaded them'));
  assert(!fs.readFileSync(RULES_FILE, 'utf8').includes('late,'), 'the stale save must not reach the file');
  await page.getByRole('button', { name: 'Cancel' }).click();

  begin('a hand edit of the file shows after a reload');
  await page.reload();
  await page.locator('tr.entry[data-name="hand-edit"]').waitFor({ timeout: WAIT_MS });
  assert((await page.locator('#file-text').textContent()).includes(`hand-edit,${HAND_PORT}`), 'the file text on the page');

  begin('a UDP rule through the form: the protocol choice, its session on the page');
  const UDP_PORT = await freePort();
  const udpEcho = dgram.createSocket('udp4');
  await new Promise((r) => udpEcho.bind(0, '127.0.0.1', r));
  udpEcho.on('message', (msg, from) => udpEcho.send(msg, from.port, from.address));
  const udpClient = dgram.createSocket('udp4');
  const udpReplies = [];
  udpClient.on('message', (m) => udpReplies.push(m.toString()));
  try {
    await page.getByRole('button', { name: '+ Add entry' }).click();
    await page.getByLabel('Name').fill('udp-echo');
    await page.getByLabel('Listening port').fill(String(UDP_PORT));
    await page.getByLabel('Protocol').selectOption('udp');
    await page.getByLabel('Destination IP or host').fill('127.0.0.1');
    await page.getByLabel('Destination port').fill(String(udpEcho.address().port));
    await page.getByRole('button', { name: 'Save' }).click();
    await page.locator('tr.entry[data-name="udp-echo"]').waitFor({ timeout: WAIT_MS });
    assert(
      fs.readFileSync(RULES_FILE, 'utf8').includes(`udp-echo,${UDP_PORT}/udp,127.0.0.1,${udpEcho.address().port}`),
      'the rules file holds the UDP rule',
    );
    await until('a UDP reply through the new rule', () => {
      if (!udpReplies.length) udpClient.send('ping over udp', UDP_PORT, '127.0.0.1');
      return udpReplies.length > 0;
    }, 5000);
    assert(udpReplies[0] === 'ping over udp', `the datagram came back whole: ${udpReplies[0]}`);
    await until('1 session on the UDP rule', async () => (await rowText(page, 'udp-echo', 'active')) === '1');
    const udpPool = page.locator(`tbody.pool[data-listen="0.0.0.0:${UDP_PORT}/udp"]`);
    assert((await udpPool.locator('.port').innerText()).startsWith(`Port ${UDP_PORT}/udp`), 'the pool is named with /udp');
    await until('the pool line to count sessions', async () => (await udpPool.locator('.pool-meta').innerText()).includes('1 sessions'));
    const udpConn = page.locator('#conns-body tr[data-rule="udp-echo"]');
    await until('the session in the connection table', async () => (await udpConn.count()) === 1);
    assert((await udpConn.innerText()).includes('session'), 'the table row says session');
    await page.locator('tr.entry[data-name="udp-echo"]').getByRole('button', { name: 'Edit' }).click();
    assert((await page.getByLabel('Protocol').inputValue()) === 'udp', 'editing shows the protocol');
    assert((await page.getByLabel('Listening port').inputValue()) === String(UDP_PORT), 'the port without its suffix');
    await page.getByRole('button', { name: 'Cancel' }).click();
  } finally {
    udpClient.close();
    udpEcho.close();
  }

  begin('a forwarder with a token, over HTTPS: the page asks for it once');
  const secure = await page.goto(TOKEN_URL);
  assert(page.url().startsWith('https://'), `the page is served over HTTPS: ${page.url()}`);
  assert(secure.headers()['strict-transport-security'] === 'max-age=31536000', 'HSTS over HTTPS');
  await until('the live indicator', async () => (await page.locator('#live-text').innerText()) === 'live');
  assert(await page.locator('#transport-banner').isHidden(), 'no plain-HTTP warning over HTTPS');
  const TOKEN_RULE_PORT = await freePort();
  await page.getByRole('button', { name: '+ Add entry' }).click();
  await page.getByLabel('Name').fill('with-token');
  await page.getByLabel('Listening port').fill(`127.0.0.1:${TOKEN_RULE_PORT}`);
  await page.getByLabel('Destination IP or host').fill('localhost');
  await page.getByLabel('Destination port').fill(String(BACKEND_PORT));
  await page.getByRole('button', { name: 'Save' }).click();
  await page.locator('#token-dialog').waitFor({ state: 'visible', timeout: WAIT_MS });
  await page.getByLabel('Token', { exact: true }).fill(WEB_TOKEN);
  await page.getByRole('button', { name: 'Use token' }).click();
  await page.locator('tr.entry[data-name="with-token"]').waitFor({ timeout: WAIT_MS });
  assert(fs.readFileSync(TOKEN_RULES_FILE, 'utf8').includes(`with-token,127.0.0.1:${TOKEN_RULE_PORT},localhost,`), 'the token page wrote its file');
  const viaToken = await until('the token rule to forward', () => connect(TOKEN_RULE_PORT).catch(() => null), 5000);
  clients.push(viaToken);
  await echo(viaToken, 'through a rule added with the token\n');

  begin('a token in the link is taken and removed from the address bar');
  const second = await context.newPage();
  second.on('dialog', async (d) => {
    dialogs.push(d.message());
    await d.dismiss();
  });
  await second.goto(`${TOKEN_URL}#token=${WEB_TOKEN}`);
  await second.locator('tr.entry[data-name="with-token"]').waitFor({ timeout: WAIT_MS });
  assert(!second.url().includes('token'), `the token stays in the address bar: ${second.url()}`);
  await second.locator('tr.entry[data-name="with-token"] td.name').click();
  await second.getByRole('button', { name: 'Delete selected (1)' }).click();
  await second.locator('#confirm-dialog').getByRole('button', { name: 'Delete' }).click();
  await until('the token rule to disappear', async () => (await second.locator('tr.entry').count()) === 0);
  assert(!(await second.locator('#token-dialog').evaluate((d) => d.open)), 'no token prompt with the link\'s token');
  await until(`port ${TOKEN_RULE_PORT} to close`, async () => (await tryConnect(TOKEN_RULE_PORT)) === 'ECONNREFUSED', 5000);
  await second.close();

  begin('a page bound off loopback over plain HTTP says the token travels unencrypted');
  await page.goto(PLAIN_URL);
  const warning = page.locator('#transport-banner');
  await warning.waitFor({ state: 'visible', timeout: WAIT_MS });
  const warned = await warning.innerText();
  assert(
    warned.startsWith('This page is served over plain HTTP: the web token and the rules travel unencrypted')
      && warned.includes('--web-cert') && warned.includes('certs --san'),
    `the banner says what and how to fix it: ${JSON.stringify(warned)}`,
  );

  assert(dialogs.length === 0, `unexpected browser dialogs: ${dialogs.join(', ')}`);
  assert(pageErrors.length === 0, `errors in the page: ${pageErrors.join('\n')}`);
  log('all checks passed');
} catch (e) {
  console.error(`web e2e FAILED at "${step}": ${e.stack || e}`);
  if (pageErrors.length) console.error(`page errors:\n${pageErrors.join('\n')}`);
  if (page) {
    const failed = path.join(os.tmpdir(), 'forwarder-web-failed.png');
    await page.screenshot({ path: failed, fullPage: true }).catch(() => {});
    console.error(`screenshot of the failure: ${failed}`);
  }
  process.exitCode = 1;
} finally {
  for (const s of streams) clearInterval(s);
  for (const c of clients) c.socket.destroy();
  if (context) await context.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
}
