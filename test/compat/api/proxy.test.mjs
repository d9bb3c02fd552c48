// Sandbox traffic on warren's single origin (README mode A, PROXY.md): envd
// behind its access token, signed URLs routed without headers, user ports by
// the E2b-Sandbox-Id/E2b-Sandbox-Port headers, the proxy's 502 answers, and a
// kill while a command runs.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { Sandbox, SandboxError } from 'e2b'
import { HOME, proxyFetch, rejection, sandboxUrl, startHttpServer, uniqueName, waitFor } from '../helpers.mjs'

const opts = { timeout: 60_000 }
const ENVD = 49983
const created = []
let sandbox

async function create(role) {
  const sb = await Sandbox.create({ timeoutMs: 10 * 60_000, metadata: { compat: 'proxy', role } })
  created.push(sb)
  return sb
}

before(async () => {
  sandbox = await create('main')
})

after(async () => {
  for (const sb of created) await Sandbox.kill(sb.sandboxId).catch(() => {})
})

// rpcList calls envd's process.Process/List through the proxy, with headers.
function rpcList(id, headers = {}) {
  return proxyFetch(id, ENVD, '/process.Process/List', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'Connect-Protocol-Version': '1', ...headers },
    body: '{}',
  })
}

describe('envd through the proxy', opts, () => {
  it('refuses a request without X-Access-Token with 401', async () => {
    const res = await rpcList(sandbox.sandboxId)
    assert.equal(res.status, 401, await res.clone().text())
    assert.deepEqual(await res.json(), {
      code: 401,
      message: 'unauthorized access, please provide a valid access token or method signing if supported',
    })
  })

  it('refuses a wrong X-Access-Token with 401', async () => {
    const res = await rpcList(sandbox.sandboxId, { 'X-Access-Token': 'not-the-token' })
    assert.equal(res.status, 401)
  })

  it('accepts the envdAccessToken of create', async () => {
    const res = await rpcList(sandbox.sandboxId, { 'X-Access-Token': sandbox.envdAccessToken })
    assert.equal(res.status, 200, await res.clone().text())
    assert.ok(Array.isArray((await res.json()).processes ?? []))
  })

  it('answers GET /health with 204 and no token', async () => {
    const res = await proxyFetch(sandbox.sandboxId, ENVD, '/health')
    assert.equal(res.status, 204)
  })

  it('keeps /init to the control plane: 404 from outside', async () => {
    const res = await proxyFetch(sandbox.sandboxId, ENVD, '/init', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Access-Token': sandbox.envdAccessToken },
      body: JSON.stringify({ accessToken: 'stolen' }),
    })
    assert.equal(res.status, 404)
    assert.deepEqual(await res.json(), {
      message: 'This endpoint is reserved for the E2B control plane and is not reachable through the sandbox URL',
      path: '/init',
      code: 404,
    })
    // The token did not change.
    assert.equal((await sandbox.commands.run('echo still-mine')).stdout, 'still-mine\n')
  })
})

describe('signed URLs on the single origin', opts, () => {
  let path
  before(async () => {
    path = `${HOME}/${uniqueName('signed')}.txt`
    await sandbox.files.write(path, 'signed content')
  })

  it('downloadUrl is on E2B_SANDBOX_URL and works with a plain fetch, no headers', async () => {
    const url = await sandbox.downloadUrl(path)
    assert.equal(new URL(url).origin, new URL(sandboxUrl).origin)
    const res = await fetch(url)
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal(await res.text(), 'signed content')
  })

  it('downloadUrl with an expiration works too; an expired one is 401 from envd', async () => {
    const res = await fetch(await sandbox.downloadUrl(path, { useSignatureExpiration: 120 }))
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal(await res.text(), 'signed content')
    const expired = await fetch(await sandbox.downloadUrl(path, { useSignatureExpiration: -10_000 }))
    assert.equal(expired.status, 401)
    assert.deepEqual(await expired.json(), { code: 401, message: 'signature is already expired' })
  })

  it('uploadUrl takes a multipart POST with no headers', async () => {
    const target = `${HOME}/${uniqueName('uploaded')}.txt`
    const form = new FormData()
    form.append('file', new Blob(['uploaded content']), 'uploaded.txt')
    const res = await fetch(await sandbox.uploadUrl(target), { method: 'POST', body: form })
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal((await res.json())[0].path, target)
    assert.equal(await sandbox.files.read(target), 'uploaded content')
    assert.equal((await sandbox.files.getInfo(target)).owner, 'user')
  })

  it('a signature no running sandbox made is 401', async () => {
    const url = new URL(await sandbox.downloadUrl(path))
    url.searchParams.set('path', '/etc/hostname')
    const res = await fetch(url)
    assert.equal(res.status, 401)
  })
})

describe('user ports by header', opts, () => {
  let served
  let local

  before(async () => {
    served = await startHttpServer(sandbox, 8080)
    local = await startHttpServer(sandbox, 8081, '127.0.0.1')
  })

  it('getHost names <port>-<id>.<E2B_DOMAIN or e2b.app> (unusable in this mode)', () => {
    const domain = process.env.E2B_DOMAIN || 'e2b.app'
    assert.equal(sandbox.getHost(8080), `8080-${sandbox.sandboxId}.${domain}`)
  })

  it('reach a server in the sandbox: 200 and its content', async () => {
    const res = await waitFor('python3 -m http.server on 8080 through the proxy', async () => {
      const r = await proxyFetch(sandbox.sandboxId, 8080, '/')
      return r.status === 200 ? r : (await r.body?.cancel(), false)
    }, 20_000, 250)
    assert.equal(await res.text(), served.marker)
  })

  it('reach a server bound to 127.0.0.1 inside the sandbox', async () => {
    const res = await waitFor('http.server on 127.0.0.1:8081 through the proxy', async () => {
      const r = await proxyFetch(sandbox.sandboxId, 8081, '/')
      return r.status === 200 ? r : (await r.body?.cancel(), false)
    }, 20_000, 250)
    assert.equal(await res.text(), local.marker)
  })

  it('a closed port is 502 "port is not open" JSON', async () => {
    const res = await proxyFetch(sandbox.sandboxId, 8999, '/')
    assert.equal(res.status, 502)
    assert.match(res.headers.get('content-type') ?? '', /^application\/json/)
    assert.deepEqual(await res.json(), {
      sandboxId: sandbox.sandboxId,
      message: 'The sandbox is running but port is not open',
      port: 8999,
      code: 502,
    })
  })

  it('an unknown sandbox is 502 "The sandbox was not found" JSON', async () => {
    const res = await proxyFetch('inosuchsandbox000000', 8080, '/')
    assert.equal(res.status, 502)
    assert.match(res.headers.get('content-type') ?? '', /^application\/json/)
    assert.deepEqual(await res.json(), {
      sandboxId: 'inosuchsandbox000000',
      message: 'The sandbox was not found',
      code: 502,
    })
  })

  it('a missing port header is 400', async () => {
    const res = await fetch(new URL('/', sandboxUrl), { headers: { 'E2b-Sandbox-Id': sandbox.sandboxId } })
    assert.equal(res.status, 400)
    assert.match(await res.text(), /missing header/)
  })
})

describe('kill while a command runs', opts, () => {
  it('the running commands reject instead of hanging; envd answers 502 after', async () => {
    const sb = await create('killed-during-run')
    const foreground = sb.commands.run('sleep 30').then(
      (r) => ({ result: r }),
      (error) => ({ error, at: Date.now() }),
    )
    const background = await sb.commands.run('sleep 30', { background: true })
    const waited = background.wait().then((r) => ({ result: r }), (error) => ({ error, at: Date.now() }))
    // Both streams are open before the kill.
    await waitFor('both sleeps listed', async () => (await sb.commands.list()).length >= 2, 10_000, 100)

    const killedAt = Date.now()
    assert.equal(await Sandbox.kill(sb.sandboxId), true)
    for (const [name, outcome] of [['commands.run', await foreground], ['handle.wait', await waited]]) {
      assert.ok(outcome.error, `${name} resolved after the kill: ${JSON.stringify(outcome.result)}`)
      assert.ok(outcome.error instanceof SandboxError, `${name}: ${outcome.error?.constructor?.name}: ${outcome.error?.message}`)
      assert.match(outcome.error.message, /sandbox was killed or reached its end of life/, name)
      assert.ok(outcome.at - killedAt < 10_000, `${name} rejected ${outcome.at - killedAt} ms after the kill`)
    }
    assert.equal(await sb.isRunning(), false)
    const health = await proxyFetch(sb.sandboxId, ENVD, '/health')
    assert.equal(health.status, 502)
    assert.equal((await health.json()).message, 'The sandbox was not found')
  })

  it('a new command on a killed sandbox fails', async () => {
    const sb = await create('killed-before-run')
    await sb.kill()
    const err = await rejection(sb.commands.run('true', { requestTimeoutMs: 10_000 }))
    assert.ok(err instanceof SandboxError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})
