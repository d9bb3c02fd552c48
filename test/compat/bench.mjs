// envd benchmarks through the official SDK in debug mode (bench.sh starts
// envd), each beside a baseline without envd:
//   - commands.run('true') round trip vs. spawnSync('bash -l -c true') from
//     Node, as the same user with the same kind of login environment;
//   - 100 MiB upload/download through files.write/read vs. a plain loopback
//     HTTP copy of the same bytes (a Node server thread that discards / serves
//     them), through the same fetch client the SDK uses.
// Prints a markdown table.
import { spawnSync } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import { once } from 'node:events'
import { readFileSync } from 'node:fs'
import { Worker } from 'node:worker_threads'
import { HOME, USER, debugSandbox, uniqueName } from './helpers.mjs'

const WARMUP = 10
const RUNS = 200
const SIZE = 100 << 20
const COPIES = 5

const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]
const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]
const mibPerSec = (ms) => (SIZE / (1 << 20)) / (ms / 1000)
const fmt = (n) => n.toFixed(n >= 100 ? 0 : n >= 10 ? 1 : 2)

async function latencies(fn) {
  for (let i = 0; i < WARMUP; i++) await fn()
  const samples = []
  for (let i = 0; i < RUNS; i++) {
    const start = performance.now()
    await fn()
    samples.push(performance.now() - start)
  }
  samples.sort((a, b) => a - b)
  return { p50: percentile(samples, 50), p99: percentile(samples, 99) }
}

// throughput returns the median MiB/s of COPIES timed runs of fn.
async function throughput(fn) {
  const rates = []
  for (let i = 0; i < COPIES; i++) {
    const start = performance.now()
    await fn()
    rates.push(mibPerSec(performance.now() - start))
  }
  return median(rates)
}

async function drain(stream) {
  let n = 0
  for await (const chunk of stream) n += chunk.length
  return n
}

function expectSize(n, what) {
  if (n !== SIZE) throw new Error(`${what}: got ${n} bytes, want ${SIZE}`)
}

// loopbackServer runs a Node http server on 127.0.0.1 in a worker thread (its
// own event loop, as envd has its own process) that discards POST bodies and
// serves `shared` on GET.
async function loopbackServer(shared) {
  const worker = new Worker(`
    const { createServer } = require('node:http')
    const { parentPort, workerData } = require('node:worker_threads')
    const data = Buffer.from(workerData)
    const server = createServer(async (req, res) => {
      if (req.method === 'POST') {
        let n = 0
        for await (const chunk of req) n += chunk.length
        res.writeHead(200, { 'Content-Type': 'text/plain' })
        res.end(String(n))
        return
      }
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': data.length })
      res.end(data)
    })
    server.listen(0, '127.0.0.1', () => parentPort.postMessage(server.address().port))
  `, { eval: true, workerData: shared })
  const [port] = await once(worker, 'message')
  return { url: `http://127.0.0.1:${port}/blob`, close: () => worker.terminate() }
}

// spawnAs returns spawnSync options that run a child as `name`, with the
// login environment envd gives its processes, so the baseline shell reads
// the same profile as the one envd starts.
function spawnAs(name) {
  const entry = readFileSync('/etc/passwd', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[0] === name)
  if (!entry) throw new Error(`no user ${name} in /etc/passwd`)
  const [, , uid, gid, , home, shell] = entry
  return {
    uid: Number(uid),
    gid: Number(gid),
    cwd: home,
    env: { HOME: home, USER: name, LOGNAME: name, SHELL: shell, PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
  }
}

const sandbox = await debugSandbox()
const rows = []

// (a) command round trip.
const viaSdk = await latencies(async () => {
  const r = await sandbox.commands.run('true')
  if (r.exitCode !== 0) throw new Error(`true exited ${r.exitCode}`)
})
const asUser = spawnAs(USER)
const bare = await latencies(async () => {
  const r = spawnSync('bash', ['-l', '-c', 'true'], asUser)
  if (r.status !== 0) throw new Error(`bash -l -c true exited ${r.status}`)
})
rows.push([
  `command round trip, ms p50 / p99 (${RUNS} runs)`,
  `${fmt(viaSdk.p50)} / ${fmt(viaSdk.p99)}`,
  `${fmt(bare.p50)} / ${fmt(bare.p99)}`,
  "SDK `commands.run('true')` vs `spawnSync('bash -l -c true')` as `user` from Node",
])

// (b) 100 MiB transfers.
// The server thread reads the bytes from shared memory; fetch and the SDK
// take only plain ArrayBuffers, so they get a copy.
const shared = new SharedArrayBuffer(SIZE)
randomFillSync(new Uint8Array(shared))
const buffer = new Uint8Array(new Uint8Array(shared)).buffer
const data = Buffer.from(buffer)
const path = `${HOME}/${uniqueName('bench')}.bin`
const loop = await loopbackServer(shared)
try {
  const uploadBuffer = await throughput(async () => {
    await sandbox.files.write(path, buffer)
  })
  const uploadStream = await throughput(async () => {
    await sandbox.files.write(path, new Blob([data]).stream())
  })
  expectSize((await sandbox.files.getInfo(path)).size, 'uploaded file')
  const downloadBytes = await throughput(async () => {
    expectSize((await sandbox.files.read(path, { format: 'bytes' })).length, 'files.read bytes')
  })
  const downloadStream = await throughput(async () => {
    expectSize(await drain(await sandbox.files.read(path, { format: 'stream' })), 'files.read stream')
  })
  const loopUpload = await throughput(async () => {
    const res = await fetch(loop.url, { method: 'POST', body: data })
    expectSize(Number(await res.text()), 'loopback POST')
  })
  const loopDownload = await throughput(async () => {
    const res = await fetch(loop.url)
    expectSize(await drain(res.body), 'loopback GET')
  })
  const note = `median of ${COPIES}; baseline: fetch to/from a Node http server thread on 127.0.0.1`
  rows.push(['upload 100 MiB (ArrayBuffer, multipart), MiB/s', fmt(uploadBuffer), fmt(loopUpload), note])
  rows.push(['upload 100 MiB (ReadableStream, octet-stream), MiB/s', fmt(uploadStream), fmt(loopUpload), note])
  rows.push(["download 100 MiB (format 'bytes'), MiB/s", fmt(downloadBytes), fmt(loopDownload), note])
  rows.push(["download 100 MiB (format 'stream'), MiB/s", fmt(downloadStream), fmt(loopDownload), note])
} finally {
  loop.close()
  await sandbox.files.remove(path).catch(() => {})
}

console.log('| benchmark | envd via SDK | baseline | notes |')
console.log('|---|---|---|---|')
for (const row of rows) console.log(`| ${row.join(' | ')} |`)
