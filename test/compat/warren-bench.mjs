// The SDK side of `warren bench` (internal/bench): the official npm `e2b`
// SDK against a warren the bench started, in mode A (E2B_API_URL,
// E2B_SANDBOX_URL, E2B_API_KEY). `warren bench` copies this file beside the
// node_modules it installs from this directory's package-lock.json and runs
// it; it is not meant to be run by hand.
//
// Input: WARREN_BENCH (JSON): counts, and the URL of the bench's loopback
// HTTP server (the floor of file transfers: POST stores the body, GET serves
// it back).
// Output: one JSON object per line on stdout. {"event": ...} lines are
// questions for the bench (it measures host memory), each answered by one
// line on stdin; the last line is {"result": ...}. Progress goes to stderr.
// Times are milliseconds.
import { randomFillSync } from 'node:crypto'
import { createInterface } from 'node:readline'
import { Sandbox } from 'e2b'

const cfg = JSON.parse(process.env.WARREN_BENCH ?? '{}')
const SANDBOX_URL = process.env.E2B_SANDBOX_URL
const ENVD_PORT = 49983
const TIMEOUT_MS = 20 * 60_000
const opts = { timeoutMs: TIMEOUT_MS, metadata: { bench: 'warren' } }

const replies = createInterface({ input: process.stdin })[Symbol.asyncIterator]()

// ask sends an event to the bench and waits for its answer line.
async function ask(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')
  const { value, done } = await replies.next()
  if (done) throw new Error(`the bench closed stdin before answering ${event}`)
  return JSON.parse(value)
}

const log = (...args) => console.error('sdk:', ...args)
const now = () => performance.now()
const describe = (err) => `${err?.name ?? 'Error'}: ${err?.message ?? err}`

// interactive creates a sandbox and runs `echo ready` in it; it returns the
// sandbox, the time to the created sandbox and to the command's end.
async function interactive(t0 = now(), createOpts = opts) {
  const sbx = await Sandbox.create(createOpts)
  const created = now()
  const r = await sbx.commands.run('echo ready')
  const done = now()
  if (r.stdout !== 'ready\n') throw new Error(`echo ready printed ${JSON.stringify(r.stdout)}`)
  return { sbx, create: created - t0, tti: done - t0 }
}

// claimedWarm reads a sandbox's log (REST v2 logs) for the node's line
// about claiming a warm VM.
async function claimedWarm(id) {
  const res = await fetch(new URL(`/v2/sandboxes/${id}/logs`, process.env.E2B_API_URL), {
    headers: { 'X-API-KEY': process.env.E2B_API_KEY },
  })
  if (!res.ok) throw new Error(`GET logs of ${id}: ${res.status}`)
  const body = await res.json()
  return (body.logs ?? []).some((l) => String(l.message ?? '').includes('claimed a warm VM'))
}

async function killAll(sandboxes) {
  await Promise.all(sandboxes.map((s) => s.kill().catch((err) => log(`kill ${s.sandboxId}: ${describe(err)}`))))
}

async function timed(n, fn) {
  const out = []
  for (let i = 0; i < n; i++) {
    const t0 = now()
    await fn(i)
    out.push(now() - t0)
  }
  return out
}

const result = {}

// 1. Time to interactive: serial after a warm-up, then a concurrent burst.
{
  // Pool misses: the bench empties warren's warm pool, so every create
  // restores the snapshot.
  await ask('warm-pool', { size: 0 })
  log(`TTI: ${cfg.warmup} warm-up, ${cfg.tti} serial with the warm pool emptied`)
  for (let i = 0; i < cfg.warmup; i++) {
    const { sbx } = await interactive()
    await sbx.kill()
  }
  const serial = [], serialCreate = []
  let keep
  for (let i = 0; i < cfg.tti; i++) {
    const { sbx, create, tti } = await interactive()
    serial.push(tti)
    serialCreate.push(create)
    if (i === cfg.tti - 1) keep = sbx
    else await sbx.kill()
  }
  // Pool hits: a pause before each create lets the pool refill; the
  // sandbox's log says whether the create claimed a warm VM.
  await ask('warm-pool', { size: cfg.warmPool })
  log(`TTI: ${cfg.tti} serial with the warm pool of ${cfg.warmPool} (${cfg.refillMs} ms between creates)`)
  const hit = [], hitCreate = [], hitMissed = []
  for (let i = 0; i < cfg.tti; i++) {
    await new Promise((r) => setTimeout(r, cfg.refillMs))
    const { sbx, create, tti } = await interactive()
    if (await claimedWarm(sbx.sandboxId)) {
      hit.push(tti)
      hitCreate.push(create)
    } else hitMissed.push(tti)
    await sbx.kill()
  }
  // The same command on a sandbox that is already up: the pool-hit yardstick
  // and the command part of the miss target.
  log('echo ready on an existing sandbox: 20 runs')
  for (let i = 0; i < 3; i++) await keep.commands.run('echo ready')
  const echo = await timed(20, () => keep.commands.run('echo ready'))
  await keep.kill()

  await ask('warm-pool', { size: cfg.warmPool })
  log(`TTI: burst of ${cfg.burst} (the warm pool full: ${cfg.warmPool} VMs)`)
  const t0 = now()
  const settled = await Promise.allSettled(Array.from({ length: cfg.burst }, () => interactive(t0)))
  const ok = settled.filter((s) => s.status === 'fulfilled').map((s) => s.value)
  await killAll(ok.map((v) => v.sbx))
  result.tti = {
    serial, serialCreate, echo, hit, hitCreate, hitMissed,
    burst: ok.map((v) => v.tti), burstCreate: ok.map((v) => v.create),
    burstErrors: settled.filter((s) => s.status === 'rejected').map((s) => describe(s.reason)),
  }
}

// 2. Command round trip, beside envd's /health through the same proxy and
// the command's own run time inside the guest.
const sbx = await Sandbox.create(opts)
try {
  log(`command round trip: ${cfg.rtt} runs after 10 warm-up`)
  const runTrue = async () => {
    const r = await sbx.commands.run('true')
    if (r.exitCode !== 0) throw new Error(`true exited ${r.exitCode}`)
  }
  for (let i = 0; i < 10; i++) await runTrue()
  const command = await timed(cfg.rtt, runTrue)
  const health = async () => {
    const res = await fetch(new URL('/health', SANDBOX_URL), {
      headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': String(ENVD_PORT) },
    })
    await res.arrayBuffer()
    if (res.status !== 204) throw new Error(`GET /health through warren answered ${res.status}`)
  }
  for (let i = 0; i < 10; i++) await health()
  const healthMs = await timed(cfg.rtt, health)
  // What envd runs for commands.run('true'), timed by bash inside the guest
  // without forks of its own ($EPOCHREALTIME is a bash variable).
  const loops = Math.min(cfg.rtt, 100)
  const script = `for i in $(seq ${loops + 5}); do s=$EPOCHREALTIME; /bin/bash -l -c true; e=$EPOCHREALTIME; echo "$s $e"; done`
  const r = await sbx.commands.run(script, { timeoutMs: 600_000 })
  const guest = r.stdout.trim().split('\n').slice(5).map((line) => {
    const [s, e] = line.split(' ').map(Number)
    return (e - s) * 1000
  })
  result.rtt = { command, health: healthMs, guest }

  // 3. Files: the SDK's write and read beside a loopback HTTP copy of the
  // same bytes through the same fetch.
  const sizes = [{ bytes: 1 << 20, copies: 20 }]
  if (cfg.largeFiles) sizes.push({ bytes: 100 << 20, copies: 5 })
  result.files = []
  for (const { bytes, copies } of sizes) {
    log(`files: ${bytes >> 20} MiB, ${copies} copies each way`)
    const data = new Uint8Array(bytes)
    randomFillSync(data)
    const path = `/home/user/warren-bench-${bytes}.bin`
    const expect = (n, what) => {
      if (n !== bytes) throw new Error(`${what}: got ${n} bytes, want ${bytes}`)
    }
    const drain = async (stream) => {
      let n = 0
      for await (const chunk of stream) n += chunk.length
      return n
    }
    const row = (name, ms) => result.files.push({ name, bytes, ms })
    row('upload', await timed(copies, () => sbx.files.write(path, data.buffer)))
    row('upload-stream', await timed(copies, () => sbx.files.write(path, new Blob([data]).stream())))
    expect((await sbx.files.getInfo(path)).size, 'uploaded file')
    row('download', await timed(copies, async () => expect((await sbx.files.read(path, { format: 'bytes' })).length, 'files.read bytes')))
    row('download-stream', await timed(copies, async () => expect(await drain(await sbx.files.read(path, { format: 'stream' })), 'files.read stream')))
    row('loopback-upload', await timed(copies, async () => {
      const res = await fetch(cfg.loopbackURL, { method: 'POST', body: data })
      expect(Number(await res.text()), 'loopback POST')
    }))
    row('loopback-download', await timed(copies, async () => {
      const res = await fetch(cfg.loopbackURL)
      expect(await drain(res.body), 'loopback GET')
    }))
    await sbx.files.remove(path)
  }
} finally {
  await sbx.kill().catch(() => {})
}

// 4. Pause and resume (Sandbox.connect resumes a paused sandbox). A server
// without pause answers an error: reported, not fatal.
if (cfg.pause > 0) {
  log(`pause and resume: ${cfg.pause} rounds`)
  let s = await Sandbox.create(opts)
  const p = { supported: true, pause: [], resume: [], resumeToCommand: [] }
  try {
    await s.commands.run('echo kept > /tmp/warren-bench-marker')
    for (let i = 0; i < cfg.pause; i++) {
      const t0 = now()
      try {
        const paused = await s.pause()
        if (!paused) throw new Error('pause() returned false: the sandbox was already paused')
      } catch (err) {
        if (i > 0) throw err
        Object.assign(p, { supported: false, error: describe(err) })
        break
      }
      const t1 = now()
      s = await Sandbox.connect(s.sandboxId, opts)
      const t2 = now()
      const r = await s.commands.run('cat /tmp/warren-bench-marker')
      const t3 = now()
      if (r.stdout !== 'kept\n') throw new Error(`after resume the marker file holds ${JSON.stringify(r.stdout)}`)
      p.pause.push(t1 - t0)
      p.resume.push(t2 - t1)
      p.resumeToCommand.push(t3 - t1)
    }
  } catch (err) {
    p.failed = describe(err)
  } finally {
    await s.kill().catch(() => {})
  }
  result.pause = p
}

// 5. Density: idle sandboxes, one after the other, until the count or the
// first failed create; the bench reads host memory before and after.
if (cfg.density > 0) {
  // Restored sandboxes only: the pool is emptied (a claimed warm VM keeps
  // its warm-* state directory, which the bench would not count).
  await ask('warm-pool', { size: 0 })
  await ask('density-start')
  log(`density: up to ${cfg.density} idle sandboxes`)
  const started = []
  const createMs = []
  let stop = ''
  for (let i = 0; i < cfg.density; i++) {
    const t0 = now()
    try {
      started.push(await Sandbox.create(opts))
    } catch (err) {
      stop = `create ${i + 1} failed: ${describe(err)}`
      break
    }
    createMs.push(now() - t0)
    if ((i + 1) % 10 === 0) log(`density: ${i + 1} running`)
  }
  await ask('density-ready', { started: started.length })
  await killAll(started)
  result.density = { started: started.length, createMs, stop }
}

process.stdout.write(JSON.stringify({ result }) + '\n')
process.exit(0)
