// Echo backends for the web page's end-to-end test: one TCP echo server per port given on the
// command line, all on 127.0.0.1. Prints "listening PORT" for each, then runs until killed.
import net from 'node:net';

const ports = process.argv.slice(2).map(Number);
if (!ports.length || ports.some((p) => !Number.isInteger(p) || p <= 0 || p > 65535)) {
  console.error('usage: node backend.mjs PORT...');
  process.exit(2);
}
for (const port of ports) {
  const server = net.createServer((socket) => {
    socket.on('error', () => socket.destroy());
    socket.pipe(socket);
  });
  server.on('error', (e) => {
    console.error(`backend ${port}: ${e.message}`);
    process.exit(1);
  });
  server.listen(port, '127.0.0.1', () => console.log(`listening ${port}`));
}
