// Warm pools of templates other than base (--warm-pool-templates, which
// run.sh gives the api stage as compat-pooled=1): once the template is built
// a create claims a warm VM of it, and after a rebuild the pool follows the
// new build.
import assert from 'node:assert/strict'
import { after, describe, it } from 'node:test'
import { Sandbox, Template } from 'e2b'
import { waitFor } from '../helpers.mjs'
import { BUILD_TIMEOUT_MS, describeRun, sh, warren } from './lib.mjs'

const NAME = 'compat-pooled' // as run.sh names it to warren up
const opts = { timeout: BUILD_TIMEOUT_MS }

after(async () => {
  const r = await warren(['template', 'rm', NAME])
  assert.equal(r.code, 0, `warren template rm ${NAME}: ${describeRun(r)}`)
})

function pooled(version) {
  return Template().fromTemplate('base').runCmd(`echo ${version} > /home/user/pooled.txt`)
}

// claimedWarm reads the sandbox's log (REST v2 logs) for the node's line
// about claiming a warm VM.
async function claimedWarm(id) {
  const res = await fetch(new URL(`/v2/sandboxes/${id}/logs`, process.env.E2B_API_URL), {
    headers: { 'X-API-KEY': process.env.E2B_API_KEY },
  })
  assert.equal(res.status, 200, `GET logs of ${id}`)
  const body = await res.json()
  return (body.logs ?? []).some((l) => String(l.message ?? '').includes('claimed a warm VM'))
}

// claimOne creates sandboxes of the template until one claims a warm VM
// (the pool fills within ~20 s of a build: warren re-resolves pooled
// templates every 15 s) and returns what its pooled.txt says.
async function claimOne() {
  return waitFor(`a create of ${NAME} that claims a warm VM`, async () => {
    const sandbox = await Sandbox.create(NAME)
    try {
      if (!(await claimedWarm(sandbox.sandboxId))) return null
      return await sh(sandbox, 'cat /home/user/pooled.txt')
    } finally {
      await sandbox.kill()
    }
  }, 90_000, 3000)
}

describe('a warm pool of a built template', opts, () => {
  it('serves creates of the template, and follows its rebuild', opts, async () => {
    await Template.build(pooled('v1'), NAME, { cpuCount: 2, memoryMB: 512 })
    assert.equal(await claimOne(), 'v1')
    await Template.build(pooled('v2'), NAME, { cpuCount: 2, memoryMB: 512 })
    assert.equal(await claimOne(), 'v2')
  })
})
