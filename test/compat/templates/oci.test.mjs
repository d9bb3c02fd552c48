// `warren template build` of a Dockerfile FROM an OCI image imported with
// `warren image import` (no registry: the network rule): the image's files,
// the steps' effects, a user of the template's own, the start command; and
// a rebuild of the unchanged template from the cache.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { Sandbox } from 'e2b'
import { uniqueName } from '../helpers.mjs'
import { BUILD_TIMEOUT_MS, dataDir, describeRun, expectSandbox, importImage, makeContext, ociArchive, warren } from './lib.mjs'

const archive = ociArchive()
// run.sh always makes the archive for this file: without it, fail loudly.
assert.ok(archive, 'no bootable OCI archive in WARREN_COMPAT_OCI_ARCHIVE (run.sh makes it with test/compat/mkimage)')
const opts = { timeout: BUILD_TIMEOUT_MS }
const image = `compat-debian-${uniqueName('img').slice(4)}:test`
const sandboxes = []

const dockerfile = `FROM ${image}
RUN id appuser >/dev/null 2>&1 || useradd --create-home --shell /bin/bash appuser
COPY --chown=appuser site /srv/site
ENV SITE_NAME=imported
WORKDIR /srv/site
USER appuser
CMD python3 -m http.server 8000
`

describe('warren template build FROM an imported OCI image', opts, () => {
  const name = uniqueName('compat-oci')
  let context
  let first

  before(async () => {
    context = makeContext('compat-oci', { Dockerfile: dockerfile, 'site/index.html': 'from the site dir' })
    await importImage(image, archive)
    first = await warren(['template', 'build', '-p', context.dir, name])
  })

  after(async () => {
    for (const sb of sandboxes) await Sandbox.kill(sb.sandboxId).catch(() => {})
    context?.remove()
    // The template and the imported image (and its root image) stay in the
    // compat data dir across runs otherwise: leave nothing of this run there.
    const rm = await warren(['template', 'rm', name])
    assert.equal(rm.code, 0, `warren template rm: ${describeRun(rm)}`)
    const rmi = await warren(['image', 'rm', '--data-dir', dataDir(), image])
    assert.equal(rmi.code, 0, `warren image rm: ${describeRun(rmi)}`)
  })

  it('builds', () => {
    assert.equal(first.code, 0, describeRun(first))
    assert.match(first.stdout, new RegExp(`Building from ${image}:`), describeRun(first))
  })

  it('gives sandboxes the image, the steps, the user and the start command', opts, async () => {
    const sandbox = await expectSandbox(name, {
      files: { '/etc/compat-image.txt': 'from the imported image', 'index.html': 'from the site dir' },
      env: { SITE_NAME: 'imported' },
      user: 'appuser',
      workdir: '/srv/site',
      process: 'python3 -m http.server 8000',
      processUser: 'appuser',
      http: { port: 8000, path: '/index.html', body: 'from the site dir' },
    })
    sandboxes.push(sandbox)
    const owner = await sandbox.commands.run('stat -c %U /srv/site/index.html')
    assert.equal(owner.stdout.trim(), 'appuser', 'COPY --chown')
    // E2B's conventions hold in an imported image too: `user` has sudo.
    const root = await sandbox.commands.run('sudo -n whoami', { user: 'user' })
    assert.equal(root.stdout.trim(), 'root')
  })

  it('rebuilds the unchanged template from the cache in under 20% of the first build', opts, async () => {
    const again = await warren(['template', 'build', '-p', context.dir, name])
    assert.equal(again.code, 0, describeRun(again))
    assert.match(again.stdout, /Skipping upload of 'site', already cached/)
    assert.ok(again.ms < first.ms * 0.2, `rebuild took ${again.ms} ms, the first build ${first.ms} ms\n${describeRun(again)}`)
  })
})
