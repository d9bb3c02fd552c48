// envd benchmarks through the official SDK in debug mode (bench.sh starts
// envd), each beside a baseline without envd:
//   - commands.run('true') round trip vs. spawnSync('bash -l -c true') from Node;
//   - 100 MiB upload/download through files.write/read vs. a plain loopback
//     HTTP copy of the same bytes (a Node server that discards / serves them).
// Prints a markdown table.
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer } from 'node:http'
import { HOME, debugSandbox, uniqueName } from './helpers.mjs'

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

// loopbackServer receives and discards POST bodies and serves data on GET.
async function loopbackServer(data) {
  const server = createServer(async (req, res) => {
    if (req.method === 'POST') {
      const n = await drain(req)
      res.writeHead(200, { 'Content-Type': 'text/plain' })
      res.end(String(n))
      return
    }
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': data.length })
    res.end(data)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return { url: `http://127.0.0.1:${server.address().port}/blob`, close: () => server.close() }
}

const sandbox = await debugSandbox()
const rows = []

// (a) command round trip.
const viaSdk = await latencies(async () => {
  const r = await sandbox.commands.run('true')
  if (r.exitCode !== 0) throw new Error(`true exited ${r.exitCode}`)
})
const bare = await latencies(async () => {
  const r = spawnSync('bash', ['-l', '-c', 'true'])
  if (r.status !== 0) throw new Error(`bash -l -c true exited ${r.status}`)
})
rows.push([
  `command round trip, ms p50 / p99 (${RUNS} runs)`,
  `${fmt(viaSdk.p50)} / ${fmt(viaSdk.p99)}`,
  `${fmt(bare.p50)} / ${fmt(bare.p99)}`,
  "SDK `commands.run('true')` vs `spawnSync('bash -l -c true')`",
])

// (b) 100 MiB transfers.
const data = randomBytes(SIZE)
const buffer = new Uint8Array(data).buffer
const path = `${HOME}/${uniqueName('bench')}.bin`
const loop = await loopbackServer(data)
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
  const note = `median of ${COPIES}; baseline: fetch to a Node http server on 127.0.0.1`
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
