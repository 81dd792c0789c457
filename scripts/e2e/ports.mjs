// Free TCP ports for the end-to-end test, below the kernel's ephemeral range (32768-60999), so
// a port cannot be taken meanwhile as some client's source port, nor be blocked by TIME_WAIT
// sockets left by load tests. Each is checked free on 0.0.0.0 (the forwarder binds there).
// `node ports.mjs N` prints N distinct ports on one line.
import net from 'node:net';
import { pathToFileURL } from 'node:url';

const LOW = 12_000;
const SPAN = 20_000;
const given = new Set();

function bindable(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ port, host: '0.0.0.0', exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/** One port free on every address right now, never the same twice in this process. */
export async function freePort() {
  const start = Math.floor(Math.random() * SPAN);
  for (let i = 0; i < SPAN; i += 1) {
    const port = LOW + ((start + i * 37) % SPAN);
    if (!given.has(port) && (await bindable(port))) {
      given.add(port);
      return port;
    }
  }
  throw new Error(`no free port between ${LOW} and ${LOW + SPAN}`);
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const n = Number(process.argv[2] || 1);
  const ports = [];
  for (let i = 0; i < n; i += 1) ports.push(await freePort());
  console.log(ports.join(' '));
}
