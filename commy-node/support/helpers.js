'use strict'
// Shared by the tests: private runtime dirs, child processes that say when
// they are ready, and where the commy CLI is.

const { spawn } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const PKG = path.resolve(__dirname, '..')
const REPO = path.resolve(PKG, '..')

const made = []
process.once('exit', () => {
  for (const dir of made) {
    try {
      fs.rmSync(dir, { recursive: true, force: true })
    } catch {
      // A socket the addon's threads were still removing; the dir is in tmp.
    }
  }
})

/** A fresh private runtime dir (mode 0700), removed when the process exits. */
function runtimeDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'commy-node-test-'))
  fs.chmodSync(dir, 0o700)
  made.push(dir)
  return dir
}

/**
 * Starts `command args` with COMMY_RUNTIME_DIR=dir; `child.started` resolves
 * once it printed a line equal to `ready` (or matching it, for a RegExp), and
 * rejects if it exits first. `child.output()`
 * is everything it printed so far; `child.exited` resolves to its exit code.
 */
function start(command, args, { dir, env = {}, ready = 'ready', timeoutMs = 60_000 } = {}) {
  const child = spawn(command, args, {
    env: { ...process.env, COMMY_RUNTIME_DIR: dir, ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  })
  let out = ''
  let err = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (err += d))
  child.output = () => `stdout:\n${out}\nstderr:\n${err}`
  child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)))
  const started = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${command} was not ready after ${timeoutMs} ms\n${child.output()}`)), timeoutMs)
    const check = () => {
      const match = (l) => (ready instanceof RegExp ? ready.test(l) : l.trim() === ready)
      if (out.split('\n').some(match)) {
        clearTimeout(timer)
        resolve(child)
      }
    }
    child.stdout.on('data', check)
    child.exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`${command} exited (${code}) before it was ready\n${child.output()}`))
    })
  })
  started.catch(() => {})
  child.started = started
  return child
}

/** Runs `command args` to completion: `{ code, stdout, stderr }`. */
function run(command, args, { dir, env = {}, input, cwd, timeoutMs = 60_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, env: { ...process.env, COMMY_RUNTIME_DIR: dir, ...env } })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`${command} ${args.join(' ')} did not finish in ${timeoutMs} ms\n${stdout}\n${stderr}`))
    }, timeoutMs)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      resolve({ code: code ?? signal, stdout, stderr })
    })
    if (input !== undefined) child.stdin.end(input)
    else child.stdin.end()
  })
}

/** The commy CLI: $COMMY_CLI, else the workspace's release or debug build. */
function cli() {
  if (process.env.COMMY_CLI) return path.resolve(process.env.COMMY_CLI)
  const candidates = [path.join(REPO, 'target/debug/commy'), path.join(REPO, 'target/release/commy')]
  const found = candidates.filter((c) => fs.existsSync(c))
  if (found.length === 0) throw new Error('the commy CLI is not built: run `cargo build -p commy-cli --bin commy` (or set COMMY_CLI)')
  // The most recently built one.
  return found.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs)[0]
}

/** A Python that can `import commy`: $COMMY_PYTHON or target/venv's; null if none. */
function python() {
  const candidates = [process.env.COMMY_PYTHON, path.join(REPO, 'target/venv/bin/python')]
  for (const c of candidates) {
    if (!c || !fs.existsSync(c)) continue
    const r = require('node:child_process').spawnSync(c, ['-c', 'import commy'], { stdio: 'ignore' })
    if (r.status === 0) return c
  }
  return null
}

/** The child-process roles of the tests (support/child.js). */
const CHILD = path.join(__dirname, 'child.js')

module.exports = { PKG, REPO, CHILD, runtimeDir, start, run, cli, python }
