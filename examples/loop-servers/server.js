// A tiny Node.js server for loopguard's end-to-end tests of the wait path.
// `GET /busy?ms=N` busy-loops on the event loop (the bug loopguard must
// find) and answers {"blocked_ms": ..., "cpu_ms": ...}, its own timing of
// the block (with `&clock=cpu`, N ms of CPU time rather than wall time;
// with `&until=PATH`, until PATH exists, N ms at most);
// `GET /fast` answers at once. Prints `listening on 127.0.0.1:PORT`.
'use strict';
const fs = require('fs');
const http = require('http');
const { performance } = require('perf_hooks');

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  let body = { ok: true };
  if (url.pathname === '/busy') {
    const ms = Number(url.searchParams.get('ms') || 100);
    // `clock=cpu`: spin until the process has used `ms` of CPU time, so a
    // preempted spin on a loaded machine still holds its loop that long.
    const byCpu = url.searchParams.get('clock') === 'cpu';
    const start = performance.now();
    const cpuStart = process.cpuUsage();
    const cpuMs = () => {
      const used = process.cpuUsage(cpuStart);
      return (used.user + used.system) / 1000;
    };
    // `until=PATH`: spin until PATH exists (looked for every 20 ms of the
    // spin), at most `ms`: a block that lasts as long as a test needs it.
    const until = url.searchParams.get('until');
    let looked = start;
    const released = () => {
      const now = performance.now();
      if (now - looked < 20) return false;
      looked = now;
      return fs.existsSync(until);
    };
    while ((byCpu ? cpuMs() : performance.now() - start) < ms && !(until && released())) {
      // spin: the event loop cannot run anything else
    }
    body = { blocked_ms: performance.now() - start, cpu_ms: cpuMs() };
  }
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(body));
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
