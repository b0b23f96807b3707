// Fan-out benchmark peer (bench/README.md, "Fan-out harness"): the minimal pub/sub server a Node team would
// write on the `ws` library. Subscribers: GET /sub/<account> upgraded to WebSocket. Publisher: POST /pub/<account>
// whose body is written as one text message to every subscriber of that account. Not a product; no auth.
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 0);
const host = process.env.HOST || '127.0.0.1';
// DEFLATE=1 negotiates permessage-deflate with the library's defaults (what "compression on" means for ws).
const deflate = process.env.DEFLATE === '1';

const subscribers = new Map(); // account -> Set of sockets

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: deflate, clientTracking: false });

const server = http.createServer((req, res) => {
  const match = /^\/pub\/([A-Za-z0-9_.-]+)$/.exec(req.url);
  if (req.method !== 'POST' || !match) {
    res.writeHead(404, { 'Content-Length': '0' });
    res.end();
    return;
  }
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const group = subscribers.get(match[1]);
    let n = 0;
    if (group) {
      // One send per subscriber: the idiomatic broadcast with ws (each send frames and writes on its own).
      for (const ws of group) {
        ws.send(body, { binary: false });
        n += 1;
      }
    }
    const answer = Buffer.from(String(n));
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': String(answer.length) });
    res.end(answer);
  });
});

server.on('upgrade', (req, socket, head) => {
  const match = /^\/sub\/([A-Za-z0-9_.-]+)$/.exec(req.url);
  if (!match) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const account = match[1];
    let group = subscribers.get(account);
    if (!group) {
      group = new Set();
      subscribers.set(account, group);
    }
    group.add(ws);
    ws.on('error', () => {});
    ws.on('close', () => {
      group.delete(ws);
      if (group.size === 0 && subscribers.get(account) === group) subscribers.delete(account);
    });
  });
});

server.keepAliveTimeout = 0; // the publisher holds its keep-alive connections for the whole run
server.listen({ port, host, backlog: 4096 }, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
