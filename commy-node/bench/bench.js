'use strict'
// Node-to-Node benchmark roles, driven by the benchmark harness
// (benches/src/node.rs, `cargo xtask bench node`): one process serves, the
// other measures. The same client code measures both transports:
//
// - commy: `mesh.call('echo', payload)` against a Node service whose handler
//   is `async (req) => req`;
// - net: a Node `net` Unix-socket echo with the same call semantics: each
//   call is a length-prefixed frame with a call id, the server answers every
//   frame with its payload, and the client resolves the call's promise when
//   the answer with its id arrives.
//
// Round trip: one call at a time, each timed with process.hrtime.bigint().
// Throughput: `inflight` calls are kept in flight (each answer starts the
// next call) until `warmup + calls` have been answered; the last `calls`
// are timed.
//
// usage:
//   node bench.js serve commy MESH | serve net SOCKET
//   node bench.js rt commy MESH SIZE ITERATIONS WARMUP
//   node bench.js tp commy MESH SIZE CALLS WARMUP INFLIGHT
//   (`net SOCKET` in place of `commy MESH` for the net echo)
// Servers print `ready` once reachable and exit when told to stop; clients
// print one JSON line with their measurement.

const net = require('node:net')
const fs = require('node:fs')
const { Mesh } = require('..')

const HEADER = 8 // u32 LE payload length, u32 LE call id

// The net echo server: answers every frame with the same frame.
function serveNet(path) {
  try {
    fs.unlinkSync(path)
  } catch {}
  const server = net.createServer((sock) => {
    sock.setNoDelay?.(true)
    let pending = Buffer.alloc(0)
    sock.on('data', (chunk) => {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk])
      let at = 0
      while (pending.length - at >= HEADER) {
        const len = pending.readUInt32LE(at)
        if (len === 0xffffffff) {
          sock.end()
          server.close()
          return
        }
        if (pending.length - at < HEADER + len) break
        sock.write(pending.subarray(at, at + HEADER + len))
        at += HEADER + len
      }
      pending = pending.subarray(at)
    })
    sock.on('error', () => {})
  })
  server.listen(path, () => console.log('ready'))
}

// A net client with the mesh's call semantics: call(payload) -> Promise<Buffer>.
function netClient(path) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(path)
    const waiting = new Map()
    let nextId = 0
    let pending = Buffer.alloc(0)
    sock.on('data', (chunk) => {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk])
      let at = 0
      while (pending.length - at >= HEADER) {
        const len = pending.readUInt32LE(at)
        if (pending.length - at < HEADER + len) break
        const id = pending.readUInt32LE(at + 4)
        const done = waiting.get(id)
        waiting.delete(id)
        done(pending.subarray(at + HEADER, at + HEADER + len))
        at += HEADER + len
      }
      pending = pending.subarray(at)
    })
    sock.on('error', reject)
    sock.on('connect', () =>
      resolve({
        call(payload) {
          const id = nextId++ >>> 0
          nextId >>>= 0
          const frame = Buffer.allocUnsafe(HEADER + payload.length)
          frame.writeUInt32LE(payload.length, 0)
          frame.writeUInt32LE(id, 4)
          payload.copy(frame, HEADER)
          sock.write(frame)
          return new Promise((done) => waiting.set(id, done))
        },
        stop() {
          const frame = Buffer.alloc(HEADER)
          frame.writeUInt32LE(0xffffffff, 0)
          sock.end(frame)
        },
      }),
    )
  })
}

async function commyClient(mesh) {
  const m = await Mesh.open({ mesh })
  return {
    call: (payload) => m.call('echo', payload),
    async stop() {
      await m.send('stop', Buffer.alloc(0))
      await m.close()
    },
  }
}

async function serveCommy(name) {
  const mesh = await Mesh.open({ mesh: name })
  await mesh.serve('echo', async (req) => req)
  const stopped = new Promise((resolve) => mesh.serve('stop', () => resolve()).then(() => console.log('ready')))
  await stopped
  await mesh.close()
}

function payloadOf(size, i) {
  const p = Buffer.alloc(size, 0xa5)
  if (size >= 4) p.writeUInt32LE(i >>> 0, 0)
  return p
}

async function roundTrip(client, size, iterations, warmup) {
  const samples = new Array(iterations)
  for (let i = 0; i < warmup + iterations; i++) {
    const p = payloadOf(size, i)
    const t = process.hrtime.bigint()
    const reply = await client.call(p)
    const ns = Number(process.hrtime.bigint() - t)
    if (!reply.equals(p)) throw new Error(`the echo of call ${i} differs from what was sent`)
    if (i >= warmup) samples[i - warmup] = ns
  }
  return { samples }
}

// One flood of `warmup + calls` calls; the clock runs from the warm-up's
// last answer to the last answer, so the timed calls start with `inflight`
// calls already in flight (a separate warm-up flood would let them all drain
// first, and the timed part would start with a ramp).
async function throughput(client, size, calls, warmup, inflight) {
  const p = payloadOf(size, 7)
  let t = process.hrtime.bigint()
  await flood(client, p, warmup + calls, inflight, warmup, () => {
    t = process.hrtime.bigint()
  })
  const elapsed_ns = Number(process.hrtime.bigint() - t)
  return { calls, bytes: calls * size, elapsed_ns }
}

// Keeps `inflight` calls in flight until `total` are answered; `mark()` runs
// when the `markAt`-th answer comes.
function flood(client, payload, total, inflight, markAt, mark) {
  return new Promise((resolve, reject) => {
    let started = 0
    let answered = 0
    const one = () => {
      started++
      client.call(payload).then((reply) => {
        if (reply.length !== payload.length) return reject(new Error('short echo'))
        if (++answered === markAt) mark()
        if (answered === total) return resolve()
        if (started < total) one()
      }, reject)
    }
    if (total === 0) return resolve()
    for (let i = 0; i < Math.min(inflight, total); i++) one()
  })
}

async function main(argv) {
  const [role, transport, where, ...nums] = argv
  const n = nums.map(Number)
  if (role === 'serve') {
    if (transport === 'net') return serveNet(where)
    if (transport === 'commy') return serveCommy(where)
  } else if (role === 'rt' || role === 'tp') {
    const client = transport === 'net' ? await netClient(where) : await commyClient(where)
    const result = role === 'rt' ? await roundTrip(client, n[0], n[1], n[2]) : await throughput(client, n[0], n[1], n[2], n[3])
    await client.stop()
    process.stdout.write(`${JSON.stringify(result)}\n`)
    return
  }
  throw new Error(`usage: node bench.js serve|rt|tp commy|net MESH|SOCKET [numbers...] (got ${argv.join(' ')})`)
}

main(process.argv.slice(2)).catch((e) => {
  console.error(`bench.js: ${e.stack ?? e}`)
  process.exit(1)
})
