// Host routing over TLS (README mode B): E2B_DOMAIN set, no E2B_API_URL or
// E2B_SANDBOX_URL, so the SDK talks to https://api.<domain> and
// https://49983-<id>.<domain>; user ports are https://<port>-<id>.<domain>
// (getHost). run.sh starts warren with --tls self-signed --domain on
// 127.0.0.1:443, trusts its CA (NODE_EXTRA_CA_CERTS) and preloads
// resolve-loopback.mjs, which resolves every name under the domain to
// 127.0.0.1.
import assert from 'node:assert/strict'
import dns from 'node:dns'
import { once } from 'node:events'
import tls from 'node:tls'
import { after, before, describe, it } from 'node:test'
import { Sandbox } from 'e2b'
import { HOME, apiKey, startHttpServer, uniqueName, waitFor } from '../helpers.mjs'

const opts = { timeout: 60_000 }
const domain = process.env.E2B_DOMAIN
const created = []
let sandbox

async function create(role) {
  const sb = await Sandbox.create({ timeoutMs: 10 * 60_000, metadata: { compat: 'domain', role } })
  created.push(sb)
  return sb
}

before(async () => {
  if (!domain || process.env.E2B_API_URL || process.env.E2B_SANDBOX_URL) {
    throw new Error('needs E2B_DOMAIN and no E2B_API_URL/E2B_SANDBOX_URL: run through ./run.sh domain')
  }
  sandbox = await create('main')
})

after(async () => {
  for (const sb of created) await Sandbox.kill(sb.sandboxId).catch(() => {})
})

// fetchUntil200 fetches url until it answers 200 (a server just started).
function fetchUntil200(url, what) {
  return waitFor(what, async () => {
    const r = await fetch(url)
    return r.status === 200 ? r : (await r.body?.cancel(), false)
  }, 20_000, 250)
}

describe('test setup', opts, () => {
  it('resolves names under the domain to 127.0.0.1 (resolve-loopback.mjs)', async () => {
    assert.equal(globalThis.__warrenResolveLoopback, domain)
    assert.deepEqual(await dns.promises.lookup(`api.${domain}`), { address: '127.0.0.1', family: 4 })
    const viaCallback = await new Promise((resolve, reject) =>
      dns.lookup(`8080-${sandbox.sandboxId}.${domain}`, { all: true }, (err, addrs) => (err ? reject(err) : resolve(addrs))))
    assert.deepEqual(viaCallback, [{ address: '127.0.0.1', family: 4 }])
  })
})

describe('the control plane at https://api.<domain>', opts, () => {
  it('serves the API with a certificate for api.<domain>, h2 by ALPN', async () => {
    const socket = tls.connect({ host: `api.${domain}`, port: 443, servername: `api.${domain}`, ALPNProtocols: ['h2', 'http/1.1'] })
    await once(socket, 'secureConnect')
    try {
      assert.equal(socket.authorized, true, String(socket.authorizationError))
      assert.equal(socket.alpnProtocol, 'h2')
    } finally {
      socket.destroy()
    }
  })

  it('answers GET /v2/sandboxes with the X-API-Key', async () => {
    const res = await fetch(`https://api.${domain}/v2/sandboxes?metadata=${encodeURIComponent(`compat=domain`)}`, {
      headers: { 'X-API-Key': apiKey },
    })
    assert.equal(res.status, 200, await res.clone().text())
    const ids = (await res.json()).map((s) => s.sandboxID)
    assert.ok(ids.includes(sandbox.sandboxId), `${sandbox.sandboxId} not in ${ids}`)
  })

  it('refuses a request without a key with 401 JSON', async () => {
    const res = await fetch(`https://api.${domain}/v2/sandboxes`)
    assert.equal(res.status, 401)
    assert.equal((await res.json()).code, 401)
  })
})

describe('envd at https://49983-<id>.<domain>', opts, () => {
  it('runs commands and moves files through the SDK', async () => {
    assert.equal(sandbox.sandboxDomain, domain)
    assert.equal((await sandbox.commands.run('echo hello; whoami')).stdout, 'hello\nuser\n')
    const path = `${HOME}/${uniqueName('domain')}.txt`
    await sandbox.files.write(path, 'over TLS')
    assert.equal(await sandbox.files.read(path), 'over TLS')
  })

  it('downloadUrl is on the sandbox host and works with a plain fetch', async () => {
    const path = `${HOME}/${uniqueName('signed')}.txt`
    await sandbox.files.write(path, 'signed over TLS')
    const url = new URL(await sandbox.downloadUrl(path))
    assert.equal(url.origin, `https://49983-${sandbox.sandboxId}.${domain}`)
    const res = await fetch(url)
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal(await res.text(), 'signed over TLS')
  })
})

describe('user ports at https://<port>-<id>.<domain>', opts, () => {
  it('getHost(8080) reaches a server in the sandbox', async () => {
    const served = await startHttpServer(sandbox, 8080)
    const host = sandbox.getHost(8080)
    assert.equal(host, `8080-${sandbox.sandboxId}.${domain}`)
    const res = await fetchUntil200(`https://${host}/`, `https://${host}/ to answer 200`)
    assert.equal(await res.text(), served.marker)
  })

  it('a closed port is 502 "port is not open" JSON', async () => {
    const res = await fetch(`https://${sandbox.getHost(8999)}/`)
    assert.equal(res.status, 502)
    assert.deepEqual(await res.json(), {
      sandboxId: sandbox.sandboxId,
      message: 'The sandbox is running but port is not open',
      port: 8999,
      code: 502,
    })
  })

  it('a killed sandbox is 502 "The sandbox was not found" JSON at its host', async () => {
    const sb = await create('killed')
    const url = `https://${sb.getHost(3000)}/`
    assert.equal(await sb.kill(), true)
    for (let i = 0; i < 2; i++) {
      const res = await fetch(url)
      assert.equal(res.status, 502)
      assert.deepEqual(await res.json(), { sandboxId: sb.sandboxId, message: 'The sandbox was not found', code: 502 })
    }
    assert.equal(await sb.isRunning(), false)
  })
})
