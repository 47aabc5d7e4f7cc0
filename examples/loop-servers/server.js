// A tiny Node.js server for loopguard's end-to-end tests of the wait path.
// `GET /busy?ms=N` busy-loops on the event loop (the bug loopguard must
// find) and answers {"blocked_ms": ...}, its own timing of the block;
// `GET /fast` answers at once. Prints `listening on 127.0.0.1:PORT`.
'use strict';
const http = require('http');
const { performance } = require('perf_hooks');

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  let body = { ok: true };
  if (url.pathname === '/busy') {
    const ms = Number(url.searchParams.get('ms') || 100);
    const start = performance.now();
    while (performance.now() - start < ms) {
      // spin: the event loop cannot run anything else
    }
    body = { blocked_ms: performance.now() - start };
  }
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(body));
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
