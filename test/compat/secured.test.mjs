// A secured sandbox: envd with an access token, as every E2B 2.x sandbox is.
//
// Debug mode carries no token, and once /init sets one it cannot be unset, so
// this file runs its own envd on a free port (not run.sh's on 49983) and
// POSTs /init {"accessToken"} to it. The token reaches the SDK the public way:
// Sandbox.connect() against a stub control plane on 127.0.0.1 that answers
// POST /v2/sandboxes/{id}/connect with envdAccessToken, with sandboxUrl
// pointing at this envd (the README's mode A). Only the control plane is
// stubbed; envd is the real binary.
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import { after, before, describe, it } from 'node:test'
import { AuthenticationError, Sandbox } from 'e2b'
import { HOME, rejection, startPrivateEnvd, uniqueName } from './helpers.mjs'

const opts = { timeout: 30_000 }
const token = randomBytes(16).toString('hex')
const TOKENLESS = 'compat-tokenless'
const WRONG_TOKEN = 'compat-wrong-token'

let envd
let controlPlane
let controlUrl
let envdVersion
let sandbox

// connectAs returns the SDK's Sandbox for id, as the stub control plane describes it.
function connectAs(id) {
  return Sandbox.connect(id, {
    debug: false,
    apiKey: 'e2b_0000000000000000000000000000000000000000',
    apiUrl: controlUrl,
    sandboxUrl: envd.url,
  })
}

before(async () => {
  envd = await startPrivateEnvd('secured-envd')
  const init = await fetch(`${envd.url}/init`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ accessToken: token }),
  })
  assert.equal(init.status, 204, `POST /init: ${init.status} ${await init.text()}`)
  envdVersion = init.headers.get('x-envd-version')
  assert.match(envdVersion ?? '', /^\d+\.\d+\.\d+/, 'X-Envd-Version on /init')

  controlPlane = createServer((req, res) => {
    const m = req.method === 'POST' && req.url.match(/^\/v2\/sandboxes\/([^/]+)\/connect$/)
    if (!m) {
      res.writeHead(404, { 'Content-Type': 'application/json' })
      res.end(JSON.stringify({ code: 404, message: `stub control plane: no ${req.method} ${req.url}` }))
      return
    }
    const id = decodeURIComponent(m[1])
    const body = { sandboxID: id, templateID: 'base', clientID: 'compat', envdVersion }
    if (id === WRONG_TOKEN) body.envdAccessToken = 'not-the-token'
    else if (id !== TOKENLESS) body.envdAccessToken = token
    res.writeHead(200, { 'Content-Type': 'application/json' })
    res.end(JSON.stringify(body))
  })
  controlPlane.listen(0, '127.0.0.1')
  await once(controlPlane, 'listening')
  controlUrl = `http://127.0.0.1:${controlPlane.address().port}`

  sandbox = await connectAs('compat-secured')
})

after(async () => {
  controlPlane?.close()
  await envd?.stop()
})

describe('access token', opts, () => {
  it('the SDK sends it: commands and files work', async () => {
    assert.equal((await sandbox.commands.run('whoami')).stdout, 'user\n')
    const path = `${HOME}/${uniqueName('secured')}.txt`
    await sandbox.files.write(path, 'secret')
    assert.equal(await sandbox.files.read(path), 'secret')
    await sandbox.files.remove(path)
  })

  it('without it, RPCs and file reads throw AuthenticationError', async () => {
    const tokenless = await connectAs(TOKENLESS)
    const rpc = await rejection(tokenless.commands.run('true'))
    assert.ok(rpc instanceof AuthenticationError, `commands.run: ${rpc?.constructor?.name}: ${rpc?.message}`)
    const fsRpc = await rejection(tokenless.files.list(HOME))
    assert.ok(fsRpc instanceof AuthenticationError, `files.list: ${fsRpc?.constructor?.name}: ${fsRpc?.message}`)
    const read = await rejection(tokenless.files.read('/etc/hostname'))
    assert.ok(read instanceof AuthenticationError, `files.read: ${read?.constructor?.name}: ${read?.message}`)
    const write = await rejection(tokenless.files.write(`${HOME}/${uniqueName('nope')}`, 'x'))
    assert.ok(write instanceof AuthenticationError, `files.write: ${write?.constructor?.name}: ${write?.message}`)
  })

  it('a wrong token throws AuthenticationError', async () => {
    const wrong = await connectAs(WRONG_TOKEN)
    const err = await rejection(wrong.commands.list())
    assert.ok(err instanceof AuthenticationError, `commands.list: ${err?.constructor?.name}: ${err?.message}`)
  })

  it('the 401 body is the upstream JSON', async () => {
    const res = await fetch(`${envd.url}/process.Process/List`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Connect-Protocol-Version': '1' },
      body: '{}',
    })
    assert.equal(res.status, 401)
    assert.deepEqual(await res.json(), {
      code: 401,
      message: 'unauthorized access, please provide a valid access token or method signing if supported',
    })
  })

  it('GET /health needs no token', async () => {
    const tokenless = await connectAs(TOKENLESS)
    assert.equal(await tokenless.isRunning(), true)
  })

  it('a second /init without the token is refused', async () => {
    const res = await fetch(`${envd.url}/init`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ accessToken: 'stolen' }),
    })
    assert.equal(res.status, 401)
    assert.equal((await sandbox.commands.run('echo still-mine')).stdout, 'still-mine\n')
  })
})

describe('signed URLs', opts, () => {
  let path
  before(async () => {
    path = `${HOME}/${uniqueName('signed')}.txt`
    await sandbox.files.write(path, 'signed content')
  })
  after(async () => {
    await sandbox.files.remove(path)
  })

  it('downloadUrl works with a plain fetch and no headers', async () => {
    const url = await sandbox.downloadUrl(path)
    assert.match(url, /[?&]signature=v1_/)
    assert.doesNotMatch(url, /signature_expiration/)
    const res = await fetch(url)
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal(await res.text(), 'signed content')
  })

  it('downloadUrl with an expiration works until it expires', async () => {
    const url = await sandbox.downloadUrl(path, { useSignatureExpiration: 120 })
    assert.match(url, /[?&]signature_expiration=\d+/)
    const res = await fetch(url)
    assert.equal(res.status, 200, await res.clone().text())
    assert.equal(await res.text(), 'signed content')
  })

  it('an expired signature is 401 "signature is already expired"', async () => {
    const url = await sandbox.downloadUrl(path, { useSignatureExpiration: -10_000 })
    const res = await fetch(url)
    assert.equal(res.status, 401)
    assert.deepEqual(JSON.parse(await res.text()), { code: 401, message: 'signature is already expired' })
  })

  it('an edited expiration invalidates the signature', async () => {
    const url = new URL(await sandbox.downloadUrl(path, { useSignatureExpiration: 120 }))
    url.searchParams.set('signature_expiration', String(Number(url.searchParams.get('signature_expiration')) + 1000))
    const res = await fetch(url)
    assert.equal(res.status, 401)
    assert.deepEqual(await res.json(), { code: 401, message: 'invalid signature' })
  })

  it('a signature for one path does not open another', async () => {
    const url = new URL(await sandbox.downloadUrl(path))
    url.searchParams.set('path', '/etc/hostname')
    const res = await fetch(url)
    assert.equal(res.status, 401)
    assert.deepEqual(await res.json(), { code: 401, message: 'invalid signature' })
  })

  it('a read signature does not allow a write', async () => {
    const url = await sandbox.downloadUrl(path)
    const form = new FormData()
    form.append('file', new Blob(['overwritten']), 'x.txt')
    const res = await fetch(url, { method: 'POST', body: form })
    assert.equal(res.status, 401)
    assert.equal(await sandbox.files.read(path), 'signed content')
  })

  it('no signature and no token is 401', async () => {
    const res = await fetch(`${envd.url}/files?path=${encodeURIComponent(path)}`)
    assert.equal(res.status, 401)
    assert.deepEqual(await res.json(), { code: 401, message: 'missing signature query parameter' })
  })

  it('a wrong X-Access-Token decides alone, even with a valid signature', async () => {
    const url = await sandbox.downloadUrl(path)
    const res = await fetch(url, { headers: { 'X-Access-Token': 'wrong' } })
    assert.equal(res.status, 401)
  })

  it('downloadUrl for root signs the username', async () => {
    const rootPath = `/root/${uniqueName('signed-root')}.txt`
    await sandbox.files.write(rootPath, 'for root', { user: 'root' })
    try {
      const url = new URL(await sandbox.downloadUrl(rootPath, { user: 'root' }))
      assert.equal(url.searchParams.get('username'), 'root')
      const res = await fetch(url)
      assert.equal(res.status, 200, await res.clone().text())
      assert.equal(await res.text(), 'for root')
      url.searchParams.set('username', 'user')
      assert.equal((await fetch(url)).status, 401, 'username swapped under the same signature')
    } finally {
      await sandbox.files.remove(rootPath, { user: 'root' })
    }
  })

  for (const [name, urlOpts] of [['without expiration', {}], ['with expiration', { useSignatureExpiration: 120 }]]) {
    it(`uploadUrl ${name}: multipart POST with no headers writes the file`, async () => {
      const target = `${HOME}/${uniqueName('uploaded')}.txt`
      try {
        const url = await sandbox.uploadUrl(target, urlOpts)
        const form = new FormData()
        form.append('file', new Blob(['uploaded content']), 'uploaded.txt')
        const res = await fetch(url, { method: 'POST', body: form })
        assert.equal(res.status, 200, await res.clone().text())
        const body = await res.json()
        assert.equal(body[0].path, target)
        assert.equal(await sandbox.files.read(target), 'uploaded content')
        assert.equal((await sandbox.files.getInfo(target)).owner, 'user')
      } finally {
        await sandbox.files.remove(target)
      }
    })
  }

  it('an expired uploadUrl is refused and writes nothing', async () => {
    const target = `${HOME}/${uniqueName('late-upload')}.txt`
    const url = await sandbox.uploadUrl(target, { useSignatureExpiration: -10_000 })
    const form = new FormData()
    form.append('file', new Blob(['too late']), 'late.txt')
    const res = await fetch(url, { method: 'POST', body: form })
    assert.equal(res.status, 401)
    assert.deepEqual(await res.json(), { code: 401, message: 'signature is already expired' })
    assert.equal(await sandbox.files.exists(target), false)
  })
})
