// Preload for the mode B stage (`node --import ./resolve-loopback.mjs`, set
// through NODE_OPTIONS by run.sh): answers 127.0.0.1 for $E2B_DOMAIN and every
// name under it (api.<domain>, <port>-<sandboxID>.<domain>), so the unchanged
// SDK reaches the warren on 127.0.0.1:443 without DNS or /etc/hosts. Other
// names resolve as usual. The SDK's npm undici, Node's built-in fetch and
// http/https all connect through net.connect, which calls dns.lookup from the
// module object at connect time, so replacing it there covers them all.
import dns from 'node:dns'

const domain = (process.env.E2B_DOMAIN ?? '').toLowerCase().replace(/\.$/, '')
if (!domain) throw new Error('resolve-loopback.mjs: E2B_DOMAIN is not set')

const LOOPBACK = '127.0.0.1'

/** isTestName reports whether host is the test domain or a name under it. */
export function isTestName(host) {
  const h = String(host).toLowerCase().replace(/\.$/, '')
  return h === domain || h.endsWith(`.${domain}`)
}

// answer builds dns.lookup's result for options (a family number or an object
// with family/all), always the IPv4 loopback address.
function answer(options) {
  const opts = typeof options === 'number' ? { family: options } : (options ?? {})
  if (opts.family === 6) {
    const err = new Error(`resolve-loopback: ${domain} names have no IPv6 address`)
    err.code = 'ENOTFOUND'
    throw err
  }
  return opts.all ? [{ address: LOOPBACK, family: 4 }] : { address: LOOPBACK, family: 4 }
}

const lookup = dns.lookup
dns.lookup = function lookupLoopback(hostname, options, callback) {
  if (typeof options === 'function') [options, callback] = [undefined, options]
  if (!isTestName(hostname)) return lookup.call(this, hostname, options ?? {}, callback)
  let result
  try {
    result = answer(options)
  } catch (err) {
    process.nextTick(callback, err)
    return {}
  }
  if (Array.isArray(result)) process.nextTick(callback, null, result)
  else process.nextTick(callback, null, result.address, result.family)
  return {}
}

const promisesLookup = dns.promises.lookup
dns.promises.lookup = async function lookupLoopbackPromise(hostname, options) {
  if (!isTestName(hostname)) return promisesLookup.call(this, hostname, options)
  return answer(options)
}

/** The marker tests check to know the preload is active. */
globalThis.__warrenResolveLoopback = domain
