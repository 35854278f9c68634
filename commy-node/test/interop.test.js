'use strict'
// One mesh, three languages: a Node service, a Rust one (the commy CLI's
// echo-server) and, when a Python with the commy package is at hand
// ($COMMY_PYTHON or target/venv), a Python one; each is called from the
// others.

const test = require('node:test')
const assert = require('node:assert/strict')

const { Mesh, CommyError } = require('..')
const { runtimeDir, start, run, cli, python } = require('../support/helpers')

// A Python service `py-reverse` that, once serving, calls the Node and Rust
// services and prints what they answered.
const PY_SERVICE = `
import commy, sys
with commy.Mesh() as mesh:
    mesh.serve("py-reverse", lambda data: bytes(reversed(bytes(data))))
    print("node says", mesh.call("node-upper", b"from python", timeout=10).decode(), flush=True)
    print("rust says", mesh.call("rust-echo", b"from python", timeout=10).decode(), flush=True)
    try:
        mesh.call("nobody-here", b"x", timeout=10)
    except commy.CommyError as e:
        print("missing is", e.code, flush=True)
    print("ready", flush=True)
    sys.stdin.read()
`

test('Node, Rust and Python services call each other', async (t) => {
  const dir = runtimeDir()
  const mesh = await Mesh.open({ runtimeDir: dir })
  await mesh.serve('node-upper', (req) => req.toString().toUpperCase())
  await mesh.serve('node-whoami', (req, { caller }) => `${caller.kind} ${caller.uid} ${caller.pid}`)

  // Rust serves; Node calls it.
  const rust = start(cli(), ['echo-server', 'rust-echo'], { dir, ready: /^serving rust-echo as / })
  await rust.started
  assert.equal((await mesh.call('rust-echo', 'from node', { timeoutMs: 10_000 })).toString(), 'from node')

  // Node serves; the Rust CLI calls it, and reports a missing service as NOT_FOUND.
  const called = await run(cli(), ['call', 'node-upper', 'from rust'], { dir })
  assert.equal(called.code, 0, called.stderr)
  assert.equal(called.stdout, 'FROM RUST\n')
  // The CLI is a local caller of this user, in a process of its own, between
  // two calls of this process (whose caller JS then knows already).
  const me = `local ${process.geteuid()} ${process.pid}`
  assert.equal((await mesh.call('node-whoami', 'x')).toString(), me)
  const who = await run(cli(), ['call', 'node-whoami', 'x'], { dir })
  assert.equal(who.code, 0, who.stderr)
  const [kind, uid, pid] = who.stdout.trim().split(' ')
  assert.deepEqual([kind, Number(uid)], ['local', process.geteuid()])
  assert.ok(![0, process.pid].includes(Number(pid)), who.stdout)
  assert.equal((await mesh.call('node-whoami', 'x')).toString(), me)
  const missing = await run(cli(), ['call', 'nobody-here', 'x'], { dir })
  assert.equal(missing.code, 1)
  assert.match(missing.stderr, /NOT_FOUND/)

  const py = python()
  if (py === null) {
    // In CI the python step runs first and installs the package: a missing
    // one there is a failure, not a reason to skip.
    assert.ok(!process.env.CI, 'CI is set but no Python with the commy package was found ($COMMY_PYTHON or target/venv)')
    t.diagnostic('no Python with the commy package ($COMMY_PYTHON or target/venv): the Python side was not run')
  } else {
    const child = start(py, ['-c', PY_SERVICE], { dir })
    await child.started
    const out = child.output()
    assert.match(out, /node says FROM PYTHON/)
    assert.match(out, /rust says from python/)
    assert.match(out, /missing is NOT_FOUND/)
    // Node and Rust call the Python service.
    assert.equal((await mesh.call('py-reverse', 'abc', { timeoutMs: 10_000 })).toString(), 'cba')
    const byRust = await run(cli(), ['call', 'py-reverse', 'xyz'], { dir })
    assert.equal(byRust.stdout, 'zyx\n', byRust.stderr)
    child.kill('SIGTERM')
  }

  await assert.rejects(mesh.call('nobody-here', 'x'), (e) => e instanceof CommyError && e.code === 'NOT_FOUND')
  rust.kill('SIGINT')
  assert.equal(await rust.exited, 0, rust.output())
  await mesh.close()
})
