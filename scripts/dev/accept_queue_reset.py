"""Run by scripts/dev/accept-queue-reset.sh inside a network namespace: a forwarder with 2 workers,
one worker stopped (SIGSTOP) so its accept queue fills, 400 connects, then SIGKILL of that worker;
prints how many connections were answered and how many reset."""
import asyncio, socket, subprocess, sys, time, os, signal, tempfile, resource
FWD = sys.argv[1]
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
async def echo(r, w):
    try:
        while (d := await r.read(65536)):
            w.write(d); await w.drain()
    except (Exception, asyncio.CancelledError): pass
    w.close()
async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    bport, fport = free(), free()
    srv = await asyncio.start_server(echo, "127.0.0.1", bport, backlog=4096)
    d = tempfile.mkdtemp()
    open(f"{d}/r.csv", "w").write(f"e,{fport},127.0.0.1,{bport}\n")
    p = subprocess.Popen([FWD, "--rules", f"{d}/r.csv", "--no-web", "--workers", "2", "--log-level", "warn"], stderr=open(f"{d}/log", "w"))
    for _ in range(200):
        try: socket.create_connection(("127.0.0.1", fport), 0.2).close(); break
        except OSError: await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    workers = [int(x) for x in subprocess.check_output(["pgrep", "-P", str(p.pid)]).split()]
    # Stop one worker first so its accept queue fills, then kill it: the queued ones are its toll.
    os.kill(workers[0], signal.SIGSTOP)
    res = {"ok": 0, "reset": 0, "other": 0}
    async def one():
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", fport), 20)
            w.write(b"x" * 16); await w.drain()
            await asyncio.wait_for(r.readexactly(16), 20)
            res["ok"] += 1; w.close()
        except (ConnectionResetError, asyncio.IncompleteReadError): res["reset"] += 1
        except Exception: res["other"] += 1
    tasks = [asyncio.create_task(one()) for _ in range(400)]
    await asyncio.sleep(1.0)
    os.kill(workers[0], signal.SIGKILL)
    await asyncio.gather(*tasks)
    print(f"tcp_migrate_req={open('/proc/sys/net/ipv4/tcp_migrate_req').read().strip()}: {res}")
    p.terminate(); p.wait()
    srv.close()
asyncio.run(main())
